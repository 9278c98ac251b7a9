"""MagMax (methods/magmax.py) and the `magmax` strategy on tiny-random."""

import copy

import pytest
import torch

from cairn.data import Example, Task
from cairn.methods.magmax import magmax, magmax_update
from cairn.options import MagMaxOptions, SequentialOptions, TrainConfig
from cairn.strategies import STRATEGIES
from cairn.workspace import Workspace

CFG = TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4, warmup_ratio=0.0, bf16=False)


def slow_magmax(vectors):
    """Entry by entry: the value of the first vector whose magnitude no other exceeds."""
    flat = [v.flatten().tolist() for v in vectors]
    out = []
    for i in range(len(flat[0])):
        best = flat[0][i]
        for v in flat[1:]:
            if abs(v[i]) > abs(best):
                best = v[i]
        out.append(best)
    return torch.tensor(out).reshape(vectors[0].shape)


def test_magmax_takes_each_entrys_largest_magnitude_with_ties_to_the_earliest_stage():
    g = torch.Generator().manual_seed(0)
    vectors = [torch.randn(4, 6, generator=g) for _ in range(3)]
    vectors[1][0, 0], vectors[2][0, 0] = 5.0, -5.0  # a tie in magnitude: stage 2's +5 stays
    vectors[1][1], vectors[2][1] = 0.0, -vectors[0][1] * 3  # a larger entry of the other sign wins
    chosen = magmax(vectors)
    torch.testing.assert_close(chosen, slow_magmax(vectors), rtol=0, atol=0)
    assert chosen[0, 0] == 5.0 and torch.equal(chosen[1], vectors[2][1])
    running = vectors[0]
    for v in vectors[1:]:
        running = magmax_update(running, v)
    torch.testing.assert_close(running, chosen, rtol=0, atol=0)


def task(name: str, n: int = 8) -> Task:
    return Task(name, "exact", {"train": [Example(f"Question: {name} code {i}?\nAnswer:", f"{name[:2]}{i}") for i in range(n)]})


@pytest.mark.parametrize("method", ["lora", "fft"])
def test_each_stage_is_the_base_plus_the_magmax_of_the_sequential_chains_task_vectors(tiny, tmp_path, method):
    model, tokenizer = tiny
    cfg = CFG if method == "lora" else TrainConfig(method="fft", epochs=1, lr=1e-3, batch_size=4, warmup_ratio=0.0, bf16=False)
    work = Workspace(tmp_path, "tiny-random", tokenizer, progress=False)
    tasks = [task("alpha"), task("beta")]
    merged = [copy.deepcopy(m) for m in STRATEGIES["magmax"](copy.deepcopy(model), iter(tasks), MagMaxOptions(lambda_=0.5), cfg, work)]
    chain = [copy.deepcopy(m) for m in STRATEGIES["sequential"](copy.deepcopy(model), iter(tasks), SequentialOptions(), cfg, work)]
    assert len(set(work.used)) == 2  # the chain's stages are sequential's, shared through the cache
    base = dict(model.named_parameters())
    taus = [{n: p.detach() - base[n] for n, p in m.named_parameters()} for m in chain]
    moved = 0
    for name, p in merged[1].named_parameters():
        expected = base[name] + 0.5 * slow_magmax([taus[0][name], taus[1][name]])
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
        moved += int((taus[0][name].abs() > taus[1][name].abs()).sum())
    assert moved > 0  # some entries come from stage 1, not the last model
    for name, p in merged[0].named_parameters():
        torch.testing.assert_close(p.detach(), base[name] + 0.5 * taus[0][name], rtol=0, atol=1e-6)
