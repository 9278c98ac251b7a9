import copy

import pytest
import torch
from safetensors.torch import load_file

import cairn.strategies.olora as olora_strategy
from cairn.config import parse_config
from cairn.data import Example, Task
from cairn.errors import ConfigError
from cairn.workspace import Workspace
from cairn.options import OLoRAOptions
from cairn.methods.olora import orthogonality_loss, penalty_ratio, stack_lora, stack_stages
from cairn.manifest import read_manifest
from cairn.strategies import STRATEGIES
from cairn.options import TrainConfig

CFG = TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4, warmup_ratio=0.0, bf16=False)


def task(name: str, n: int = 8) -> Task:
    return Task(name, "exact", {"train": [Example(f"Question: {name} code {i}?\nAnswer:", f"{name[:2]}{i}") for i in range(n)]})


def run_olora(tiny, root, opts: OLoRAOptions, cfg: TrainConfig = CFG) -> tuple[Workspace, list]:
    """Two O-LoRA stages on tiny-random through a real workspace; the stacked adapters' folders."""
    model, tokenizer = tiny
    work = Workspace(root, "tiny-random", tokenizer, progress=False)
    stages = STRATEGIES["olora"](copy.deepcopy(model), iter([task("alpha"), task("beta")]), opts, cfg, work)
    models = list(stages)
    assert len(models) == 2
    return work, models


def test_orthogonality_loss_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    a_new = [torch.randn(3, 5, generator=g), torch.randn(2, 7, generator=g)]
    a_prev = [torch.randn(4, 5, generator=g), torch.randn(6, 7, generator=g)]
    direct = sum(
        abs(sum(new[i, k] * prev[j, k] for k in range(new.shape[1])))
        for new, prev in zip(a_new, a_prev)
        for i in range(new.shape[0])
        for j in range(prev.shape[0])
    )
    assert orthogonality_loss(a_new, a_prev, raw=True).item() == pytest.approx(float(direct), rel=1e-5)  # the study's sum
    per_module = [(new @ prev.T).abs().mean() for new, prev in zip(a_new, a_prev)]
    assert orthogonality_loss(a_new, a_prev).item() == pytest.approx(float(sum(per_module) / 2), rel=1e-5)
    eye = torch.eye(4)
    assert orthogonality_loss([eye[:2]], [eye[2:]]).item() == 0.0
    assert orthogonality_loss([], []).item() == 0.0


def test_stacked_lora_is_the_sum_of_the_stage_deltas():
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g), s) for r, s in ((2, 2.0), (3, 0.5))]
    a, b = stack_lora(parts, scale=2.0)
    assert a.shape == (5, 6) and b.shape == (5, 5)
    torch.testing.assert_close(2.0 * b @ a, sum(s * bi @ ai for ai, bi, s in parts))


def test_the_saved_stacked_adapter_loads_and_equals_the_two_adapter_model(tiny, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, _ = tiny
    target = ["q_proj", "v_proj", "down_proj"]
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=target), adapter_name="one")
    model.add_adapter("two", LoraConfig(r=3, lora_alpha=12, target_modules=target))  # a different scale: folded into B
    model.base_model.set_adapter(["one", "two"])
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(expected, base(input_ids=ids).logits, atol=1e-3)
        stack_stages(model, ["one", "two"]).save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
        assert loaded.peft_config["default"].r == 5
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_the_normalised_orthogonality_term_does_not_grow_with_the_number_of_modules_or_the_rank():
    g = torch.Generator().manual_seed(1)
    new, prev = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    one = orthogonality_loss([new], [prev]).item()
    assert orthogonality_loss([new] * 30, [prev] * 30).item() == pytest.approx(one, rel=1e-6)
    assert orthogonality_loss([new] * 30, [prev] * 30, raw=True).item() == pytest.approx(30 * orthogonality_loss([new], [prev], raw=True).item(), rel=1e-6)
    assert orthogonality_loss([torch.cat([new, new])], [prev]).item() == pytest.approx(one, rel=1e-6)  # twice the rows, the same mean


def test_the_penalty_ratio_divides_a_steps_penalty_by_its_task_loss():
    assert penalty_ratio([2.0, 1.0], [10.0, 5.0]) == {"first": 0.25, "last": 0.25}


def test_a_stage_records_its_penalty_ratio_and_the_raw_sum_is_modules_times_r_squared_the_mean(tiny, tmp_path):
    from peft.tuners.lora import LoraLayer

    norm, models = run_olora(tiny, tmp_path, OLoRAOptions(lambda1=1.0))
    raw, _ = run_olora(tiny, tmp_path, OLoRAOptions(lambda1=1.0, raw=True))  # the same stage 1, init and first batch
    modules = sum(isinstance(m, LoraLayer) for m in models[-1].modules())
    first, first_raw = norm.notes["penalty_ratio"]["first"], raw.notes["penalty_ratio"]["first"]
    assert 0 < first < first_raw and norm.notes["penalty_ratio"]["last"] >= 0
    assert first_raw / first == pytest.approx(modules * CFG.lora_r**2, rel=0.01)


def test_a_stage_reused_from_the_cache_records_the_penalty_ratio_it_was_trained_with(tiny, tmp_path):
    trained, _ = run_olora(tiny, tmp_path, OLoRAOptions(lambda1=1.0))
    reused, _ = run_olora(tiny, tmp_path, OLoRAOptions(lambda1=1.0))  # the same work: loaded, not trained
    assert reused.notes["penalty_ratio"] == trained.notes["penalty_ratio"]


def overlap(folder, r: int) -> float:
    """sum |A_2 A_1ᵀ| over modules, read from the stacked adapter of two rank-r stages."""
    state = load_file(folder / "adapter_model.safetensors")
    a = [t for k, t in state.items() if "lora_A" in k]
    return orthogonality_loss([t[r:] for t in a], [t[:r] for t in a], raw=True).item()


def test_the_orthogonality_term_reduces_the_overlap_with_earlier_stages(tiny, tmp_path):
    plain, _ = run_olora(tiny, tmp_path / "plain", OLoRAOptions(lambda1=0.0))
    ortho, _ = run_olora(tiny, tmp_path / "ortho", OLoRAOptions(lambda1=10.0))
    before, after = overlap(plain.used[-1], CFG.lora_r), overlap(ortho.used[-1], CFG.lora_r)
    assert after < 0.5 * before


def test_olora_stacks_stages_and_a_rerun_reuses_them(tiny, tmp_path, monkeypatch):
    opts = OLoRAOptions(lambda2=0.01)
    work, models = run_olora(tiny, tmp_path, opts)
    first, second = work.used
    assert read_manifest(first)["task"] == "alpha" and read_manifest(second)["task"] == "beta"
    assert first.parent.name == "olora"  # lambda2 applies from stage 1 on
    assert run_olora(tiny, tmp_path / "plain", OLoRAOptions())[0].used[0].parent.name == "contributions"  # else stage 1 is the shared LoRA contribution
    assert models[-1].peft_config["default"].r == 2 * CFG.lora_r
    assert work.cost()["tokens"] > 0 and work.cost()["trainable_params"] > 0

    calls = []
    monkeypatch.setattr(olora_strategy, "train", lambda *a, **k: calls.append(1))
    again, reloaded = run_olora(tiny, tmp_path, opts)
    assert calls == [] and again.used == work.used
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded[-1](input_ids=ids).logits, models[-1](input_ids=ids).logits)


def test_olora_refuses_full_fine_tuning_and_parses_its_options(tiny, tmp_path):
    with pytest.raises(ConfigError, match="LoRA adapters only"):
        run_olora(tiny, tmp_path, OLoRAOptions(), TrainConfig(method="fft"))
    cfg = parse_config({"base": "tiny-random", "tasks": ["pack:people"], "strategies": [{"name": "o", "kind": "olora", "lambda1": 1.0}]})
    assert cfg.strategies[0].typed_options() == OLoRAOptions(lambda1=1.0)
    with pytest.raises(ConfigError):
        parse_config({"base": "tiny-random", "tasks": ["pack:people"], "strategies": [{"name": "o", "kind": "olora", "lambda1": -1}]})
