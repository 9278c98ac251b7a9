import torch

from cairn.data.batching import encode
from cairn.data.task import Example, Task
from cairn.evaluation import generation, likelihood
from cairn.evaluation.likelihood import candidate_logprobs, likelihood_scores

TASK = Task("t", "exact", {"test": [Example(f"Question: capital {i}?\nAnswer:", a) for i, a in enumerate(["Paris", "Berlin town", "Rome", "Madrid"])]})


def direct_logprob(model, tokenizer, ex: Example) -> float:
    """The answer's mean token log-probability from one forward pass over prompt + answer."""
    f = encode(ex, tokenizer)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1].float(), -1)
    answer = [(i, t) for i, t in enumerate(f["labels"][1:]) if t != -100]
    return sum(logp[i, t].item() for i, t in answer) / len(answer)


def test_the_answer_logprob_equals_a_direct_computation_one_example_at_a_time(tiny):
    model, tokenizer = tiny
    ex = TASK.test[1]
    assert abs(candidate_logprobs(model, tokenizer, [ex.prompt], [[ex.answer]])[0][0] - direct_logprob(model, tokenizer, ex)) < 1e-4


FEW_SHOT = "Question: What is the capital of Egypt?\nAnswer: Cairo\n\nQuestion: What is the opposite of up?\nAnswer: down\n\n"


def test_candidates_read_from_a_shared_prefix_cache_score_as_each_read_whole(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts = [FEW_SHOT + f"Question: {q}\nAnswer:" for q in ("Where was Ada born?", "Hi?", "What is two plus two, and why does it matter?")]
    candidates = [["London", "Paris town", "x"], ["Hello there"], ["four", "five"]]  # uneven counts and lengths
    reads = []
    monkeypatch.setattr(likelihood, "prefix_cache", lambda m, ids, device: reads.append(len(ids)) or generation.prefix_cache(m, ids, device))
    scores = candidate_logprobs(model, tokenizer, prompts, candidates, batch_size=2)
    assert len(reads) == 1 and reads[0] >= generation.MIN_SHARED_PREFIX  # the few-shot examples were read once
    assert [len(s) for s in scores] == [3, 1, 2]
    for p, cands, got in zip(prompts, candidates, scores):
        for a, lp in zip(cands, got):
            assert abs(lp - direct_logprob(model, tokenizer, Example(p, a))) < 1e-4


def test_batching_does_not_change_the_scores(tiny):
    model, tokenizer = tiny
    one = likelihood_scores(model, tokenizer, TASK, batch_size=1)
    many = likelihood_scores(model, tokenizer, TASK, batch_size=16)
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(one.rows, many.rows))
    assert one.n == 4 and 0.0 <= many.ranked_first <= 1.0 and all(len(r["alternatives"]) == 3 for r in many.rows)


def test_ranked_first_counts_the_examples_whose_answer_beats_every_alternative(tiny):
    model, tokenizer = tiny
    result = likelihood_scores(model, tokenizer, TASK, alternatives=2)
    expected = sum(all(r["logprob"] > v for v in r["alternatives"].values()) for r in result.rows) / 4
    assert result.ranked_first == expected and all(r["answer"] not in r["alternatives"] for r in result.rows)
    assert result.mean_logprob == sum(r["logprob"] for r in result.rows) / 4 < 0
