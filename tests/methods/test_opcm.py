"""OPCM (methods/opcm.py) against a transcription of FusionBench's full-matrix procedure, and the `opcm` strategy."""

import copy
import math

import pytest
import torch

from cairn.data import Example, Task
from cairn.methods.opcm import ContinualMerge, project_out, split_rank
from cairn.options import OPCMOptions, TrainConfig
from cairn.strategies import STRATEGIES
from cairn.workspace import Workspace


def fusionbench_projection(merged, task, alpha):
    """FusionBench's merge_linear_weights step, with full-size U and V."""
    u, s, vh = torch.linalg.svd(merged, full_matrices=True)
    v = vh.T
    k = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    p = u.T @ task @ v
    p.diagonal().fill_(0)
    p[:k, :k] = 0
    return u @ p @ v.T


def fusionbench_merge(tasks, linear, alpha):
    """FusionBench's loop over models: the first is the merge; each next one projected, summed with
    the rescaled merge, and the sum scaled to the contributions' mean norm."""
    def norm(d):
        return math.sqrt(sum(float(t.pow(2).sum()) for t in d.values()))

    merged, lam, norms, out = dict(tasks[0]), 1.0, [norm(tasks[0])], [dict(tasks[0])]
    for task in tasks[1:]:
        norms.append(norm(task))
        avg = sum(norms) / len(norms)
        total = {n: lam * merged[n] + (fusionbench_projection(merged[n], t, alpha) if n in linear else t) for n, t in task.items()}
        lam = norm(total) / avg
        merged = {n: t * avg / norm(total) for n, t in total.items()}
        out.append(merged)
    return out


def test_the_split_rank_is_where_the_cumulative_share_first_exceeds_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])  # shares 0.4, 0.7, 0.9, 1.0
    assert [split_rank(s, a) for a in (0.3, 0.5, 0.8, 0.95)] == [0, 1, 2, 3]


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
def test_the_reduced_projection_equals_fusionbenchs_full_matrix_one(shape):
    g = torch.Generator().manual_seed(sum(shape))
    merged = torch.randn(*shape, generator=g, dtype=torch.float64)
    low_rank = torch.randn(shape[0], 2, generator=g, dtype=torch.float64) @ torch.randn(2, shape[1], generator=g, dtype=torch.float64)
    task = torch.randn(*shape, generator=g, dtype=torch.float64)
    for prev in (merged, low_rank + 0.01 * merged):
        expected = fusionbench_projection(prev, task, 0.5)
        torch.testing.assert_close(project_out(prev.double(), task, 0.5).double(), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(expected, task)  # it did remove something


def test_the_running_merge_matches_fusionbenchs_loop_and_keeps_the_mean_norm():
    g = torch.Generator().manual_seed(3)
    tasks = [{"w": torch.randn(5, 8, generator=g), "norm": torch.randn(8, generator=g)} for _ in range(4)]
    merging = ContinualMerge(alpha=0.4)
    expected = fusionbench_merge(tasks, {"w"}, 0.4)
    for task, want in zip(tasks, expected):
        got = merging.add(task, {"w"})
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    norms = [math.sqrt(sum(float(t.pow(2).sum()) for t in task.values())) for task in tasks]
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in got.values())) == pytest.approx(sum(norms) / 4, rel=1e-5)


def task(name: str, n: int = 8) -> Task:
    return Task(name, "exact", {"train": [Example(f"Question: {name} code {i}?\nAnswer:", f"{name[:2]}{i}") for i in range(n)]})


def test_opcm_folds_the_per_task_contributions_into_one_running_merge(tiny, tmp_path):
    from peft import PeftModel

    model, tokenizer = tiny
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4, warmup_ratio=0.0, bf16=False)
    work = Workspace(tmp_path, "tiny-random", tokenizer, progress=False)
    stages = [copy.deepcopy(m) for m in STRATEGIES["opcm"](copy.deepcopy(model), iter([task("alpha"), task("beta")]), OPCMOptions(), cfg, work)]
    first, second = work.used
    assert first.parent.name == "contributions" and work.notes["contributions"] == [first.name, second.name]
    base = dict(model.named_parameters())
    alone = [dict(PeftModel.from_pretrained(copy.deepcopy(model), str(f)).merge_and_unload().named_parameters()) for f in (first, second)]
    for name, p in stages[0].named_parameters():  # stage 1 is the first contribution itself
        torch.testing.assert_close(p.detach(), alone[0][name].detach(), rtol=0, atol=1e-6)
    taus = [{n: (a[n] - base[n]).detach() for n in base} for a in alone]
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = fusionbench_merge(taus, {n for n in base if n in weights}, 0.5)[1]
    for name, p in stages[1].named_parameters():
        torch.testing.assert_close(p.detach() - base[name].detach(), expected[name], rtol=1e-3, atol=1e-5)


def test_opcm_runs_in_the_semi_setting_end_to_end_with_each_contribution_alone_beside_it(tmp_path):
    import cairn
    from cairn.config import parse_config
    from conftest import code_tasks

    config = parse_config({
        "name": "opcm", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": "semi",
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "opcm", "kind": "opcm", "alpha": 0.3}],
    })  # fmt: skip
    entry = cairn.run(config, tmp_path / "run", progress=False, log=lambda *_: None)["strategies"]["opcm"]
    assert len(entry["R"]) == 3 and entry["summary"]["op"] is not None
    assert [len(s["contributions"]) for s in entry["stages"]] == [1, 2] and all("alone" in s and s["opcm_scale"] > 0 for s in entry["stages"])
