import pytest

from cairn.data import Example, Task
from cairn.evaluation import evaluate_task, generate, generation
from cairn.evaluation.generation import shared_prefix
from cairn.evaluation.evaluate import max_new_tokens_for, single_line

PROMPTS = [
    "Question: Where was Ada born?\nAnswer:",
    "Hi",
    "The quick brown fox jumps over the lazy dog and then",
    "Question: what is two plus two, and why does it matter so much to so many people?\nAnswer:",
    "Once",
]


def test_batched_generation_equals_unbatched(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=8)
    alone = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone
    assert any(batched)  # the random model does produce text


def test_batched_generation_equals_plain_hf_generate(tiny):
    model, tokenizer = tiny
    ids = tokenizer(PROMPTS[2], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)[2] == expected


FEW_SHOT = "Question: What is the capital of Egypt?\nAnswer: Cairo\n\nQuestion: What is the opposite of up?\nAnswer: down\n\n"


def test_shared_prefix_leaves_every_prompt_a_token():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: the last token is still read
    assert shared_prefix([[7, 2], [1, 2]]) == 0
    assert shared_prefix([[1, 2, 3]]) == 0  # one prompt: nothing to share


def test_prompts_with_a_shared_prefix_read_it_once_and_decode_as_alone(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = [FEW_SHOT + f"Question: {q}\nAnswer:" for q in ("Where was Ada born?", "Hi?", "What is two plus two, and why does it matter?")]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    assert shared_prefix(encoded) >= generation.MIN_SHARED_PREFIX
    reads = []
    original = generation.prefix_cache
    monkeypatch.setattr(generation, "prefix_cache", lambda m, ids, device: reads.append(len(ids)) or original(m, ids, device))
    batched = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=2)
    assert reads == [shared_prefix(encoded)]  # once for both batches
    alone = [generate(model, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone and any(batched)
    model.reads_whole_prompt = True  # e.g. a LoRA-MoE routing by the whole prompt
    try:
        assert generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=2) == alone
    finally:
        del model.reads_whole_prompt
    assert len(reads) == 1


def test_stop_at_newline_cuts_the_first_line(tiny):
    model, tokenizer = tiny
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=24)
    cut = generate(model, tokenizer, PROMPTS, max_new_tokens=24, stop_at_newline=True)
    for f, c in zip(full, cut):
        assert "\n" not in c
        assert f.startswith(c)


def test_first_character_stops_each_prompt_once_it_has_one_and_keeps_the_choice(tiny):
    from cairn.evaluation.metrics import score

    model, tokenizer = tiny
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=2)
    short = generate(model, tokenizer, PROMPTS, max_new_tokens=24, batch_size=2, first_character=True)
    for f, c in zip(full, short):
        assert f.startswith(c) and len(c) <= len(f)
        assert score("choice", c, f) == score("choice", f, f)  # the same first non-space character
    assert sum(map(len, short)) < sum(map(len, full))  # it did stop early
    # A choice task is generated so, and scores as the whole text would.
    task = Task("c", "choice", {"test": [Example(p, f or "x") for p, f in zip(PROMPTS, full)]})
    result = evaluate_task(model, tokenizer, task)
    assert [r["prediction"] for r in result.predictions] == short
    assert result.score == pytest.approx(sum(score("choice", f, f or "x") for f in full) / len(full))


def test_evaluate_task_keeps_predictions_and_sizes_generation(tiny):
    model, tokenizer = tiny
    task = Task("t", "exact", {"test": [Example(p, "x") for p in PROMPTS], "train": [Example("p", "a b c d e f g h")]})
    assert single_line(task)
    assert max_new_tokens_for(task, tokenizer) >= len(tokenizer(" a b c d e f g h")["input_ids"])
    result = evaluate_task(model, tokenizer, task)
    assert result.n == len(PROMPTS) and len(result.predictions) == len(PROMPTS)
    assert set(result.predictions[0]) == {"prompt", "answer", "prediction", "score"}
    assert result.score == pytest.approx(sum(r["score"] for r in result.predictions) / len(PROMPTS))


@pytest.mark.slow
def test_bundled_model_batched_equals_unbatched_on_probes():
    from cairn.data import load_task
    from cairn.models import load_model

    model, tokenizer = load_model("bundled:smollm2-135m")
    prompts = [e.prompt for e in load_task("probe:general").test[:12]]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=12, stop_at_newline=True)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, stop_at_newline=True)[0] for p in prompts]
    assert batched == alone
