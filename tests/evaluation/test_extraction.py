"""Answer extraction: Cairn's first-clause `exact` equals lm-eval-harness's regex filter plus its
exact_match (ignoring case and punctuation) on the same generations."""

import pytest

from cairn.data.task import Example, Task
from cairn.errors import DataError
from cairn.evaluation.metrics import _CLAUSE, extract, score

# (generation, answer): completions as a base model writes them
CASES = [
    ("Jupiter, but it's not the", "Jupiter"),
    (" Paris. It is also", "Paris"),
    ("3.14 is pi", "3.14 is pi"),
    ("Berlin\nQuestion: what", "Berlin"),
    ("the Nile; it flows", "Nile"),
    ("Mount Everest! The", "Mount Everest"),
    ("Jupiterian moons", "Jupiter"),
    ("sodium", "Na"),
    ("", "Rome"),
]


def test_the_first_clause_filter_scores_as_lm_eval_harness_does():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter, WhitespaceFilter

    generations = [[g] for g, _ in CASES]
    stripped = WhitespaceFilter().apply(generations, [None] * len(CASES))
    filtered = RegexFilter(regex_pattern=_CLAUSE.pattern, group_select=0, fallback="").apply(stripped, [None] * len(CASES))
    theirs = [exact_match_hf_evaluate([f[0].strip()], [a], ignore_case=True, ignore_punctuation=True)["exact_match"] for f, (_, a) in zip(filtered, CASES)]
    ours = [score("exact", g, a, extraction="first_clause") for g, a in CASES]
    assert ours == theirs
    assert ours == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # "the Nile" is not "Nile"; "sodium" is not "Na"


def test_each_extraction_keeps_what_its_name_says():
    text = "Jupiter, but it's not the\nnext line"
    assert extract(text, "full") == text
    assert extract(text, "first_line") == "Jupiter, but it's not the"
    assert extract(text, "first_clause") == "Jupiter"
    assert score("exact", text, "Jupiter") == 0.0  # the whole generation is judged by default
    assert score("exact", "jupiter is big", "Jupiter", extraction="prefix") == 1.0
    assert score("exact", "Jupiterian", "Jupiter", extraction="prefix") == 0.0  # not at a word boundary


def test_an_unknown_extraction_is_refused_with_the_allowed_ones():
    with pytest.raises(DataError, match="unknown extract 'first_word'; expected one of full, first_line, first_clause, prefix"):
        Task("t", "exact", {"test": [Example("q", "a")]}, "first_word")


def test_a_task_spec_sets_the_extraction_and_a_limited_task_keeps_it():
    from cairn.config import parse_config

    cfg = parse_config({"tasks": [{"source": "pack:people?facts=4", "extract": "first_clause"}], "probe": None, "strategies": [{"name": "s", "kind": "sequential"}]})
    tasks, _ = cfg.load_tasks()
    assert tasks[0].extract == "first_clause" and tasks[0].limited({"test": 1}).extract == "first_clause"
