import torch

from cairn.data.batching import encode
from cairn.data.task import Example, Task
from cairn.evaluation.likelihood import answer_logprobs, likelihood_scores

TASK = Task("t", "exact", {"test": [Example(f"Question: capital {i}?\nAnswer:", a) for i, a in enumerate(["Paris", "Berlin town", "Rome", "Madrid"])]})


def test_the_answer_logprob_equals_a_direct_computation_one_example_at_a_time(tiny):
    model, tokenizer = tiny
    ex = TASK.test[1]
    f = encode(ex, tokenizer)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1].float(), -1)
    answer = [(i, t) for i, t in enumerate(f["labels"][1:]) if t != -100]
    direct = sum(logp[i, t].item() for i, t in answer) / len(answer)
    assert abs(answer_logprobs(model, tokenizer, [ex])[0] - direct) < 1e-4


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
