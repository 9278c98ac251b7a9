"""Knowledge packs: deterministic, correctly sized, and test phrasings never seen in train."""

import pytest

from cairn.data.packs import PACKS, list_packs, make_facts, make_pack
from cairn.errors import DataError

NAMES = sorted(PACKS)


def test_registry_has_the_four_domains_with_descriptions():
    assert {"people", "compounds", "companies", "countries"} <= set(PACKS)
    listed = dict(list_packs())
    assert set(listed) == set(PACKS)
    assert all(desc and "\n" not in desc for desc in listed.values())


@pytest.mark.parametrize("name", NAMES)
def test_same_arguments_give_identical_tasks(name):
    assert make_pack(name, 20, seed=3) == make_pack(name, 20, seed=3)


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_give_different_facts(name):
    assert make_pack(name, 20, seed=0).test != make_pack(name, 20, seed=1).test


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n_facts", [1, 7, 50])
def test_split_sizes_and_metric(name, n_facts):
    task = make_pack(name, n_facts)
    assert (task.name, task.metric) == (name, "exact")
    assert len(task.train) == 3 * n_facts
    assert len(task.eval) == len(task.test) == n_facts


@pytest.mark.parametrize("name", NAMES)
def test_eval_and_test_phrasings_are_never_trained_on(name):
    task = make_pack(name, 50)
    train_prompts = {ex.prompt for ex in task.train}
    assert not train_prompts & {ex.prompt for ex in task.eval}
    assert not train_prompts & {ex.prompt for ex in task.test}
    assert not {ex.prompt for ex in task.eval} & {ex.prompt for ex in task.test}
    for rel in PACKS[name].relations:
        assert len(set(rel.templates)) == 5


@pytest.mark.parametrize("name", NAMES)
def test_every_tested_fact_is_taught_in_three_phrasings(name):
    task = make_pack(name, 50)
    facts = make_facts(name, 50)
    train = set(task.train)
    for fact, test_ex in zip(facts, task.test, strict=True):
        assert fact.entity in test_ex.prompt and test_ex.answer == fact.answer
        taught = [ex for ex in train if fact.entity in ex.prompt and ex.answer == fact.answer]
        assert len(taught) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_prompts_are_bare_questions_unlike_the_probe_and_answers_are_short(name):
    task = make_pack(name, 50)
    for ex in task.train + task.eval + task.test:
        assert ex.prompt.endswith("?") and "Question:" not in ex.prompt and "\n" not in ex.prompt
        assert len(ex.prompt.split()) < 25
        assert 1 <= len(ex.answer.split()) <= 3
        assert ex.answer == ex.answer.strip() and ex.answer[-1].isalnum()


@pytest.mark.parametrize("name", NAMES)
def test_entities_are_unique_and_answers_varied(name):
    facts = make_facts(name, 200)
    n_relations = len(PACKS[name].relations)
    assert n_relations >= 2
    assert len({f.entity for f in facts}) == 200 // n_relations
    for rel in PACKS[name].relations:
        answers = [f.answer for f in facts if f.relation is rel]
        assert len(set(answers)) >= 8


def test_odd_n_facts_takes_a_prefix_of_entity_by_relation():
    facts = make_facts("people", 5)
    assert [f.relation.name for f in facts] == ["birthplace", "profession"] * 2 + ["birthplace"]
    assert len({f.entity for f in facts}) == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packs_use_different_entities(seed):
    entities = {name: {f.entity for f in make_facts(name, 200, seed)} for name in NAMES}
    for i, a in enumerate(NAMES):
        for b in NAMES[i + 1 :]:
            assert not entities[a] & entities[b], (a, b)


def test_unknown_pack_error_names_the_available_packs():
    with pytest.raises(DataError) as err:
        make_pack("planets")
    assert "planets" in str(err.value)
    assert all(name in str(err.value) for name in PACKS)


@pytest.mark.parametrize("n_facts", [0, -3])
def test_n_facts_below_one_is_refused(n_facts):
    with pytest.raises(DataError, match="n_facts"):
        make_pack("people", n_facts)


@pytest.mark.parametrize("name", NAMES)
def test_entities_of_a_default_pack_share_no_leading_syllable(name):
    from cairn.data.packs import _syllables

    entities = {f.entity for f in make_facts(name, 50)}
    seen: set[str] = set()
    for e in sorted(entities):
        assert not _syllables(e) & seen, e
        seen |= _syllables(e)
