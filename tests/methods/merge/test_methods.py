"""Merge methods against direct formulas; adapters and streaming against in-memory merges."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from cairn.cli import main
from conftest import MADE_FROM, stored_contribution
from cairn.methods.merge.streaming import merge_models
from cairn.options import MergeOptions
from cairn.methods.merge.methods import magnitude_threshold, merge_tensor
from cairn.weights.tensor_files import STORAGE, bf16_to_float32, to_storage


def magnitude_mask(delta: np.ndarray, density: float) -> np.ndarray:
    """Test oracle: the boolean mask of the entries of `delta` (a task vector) that TIES keeps at this density."""
    t, cut = magnitude_threshold(np.zeros_like(delta), delta, density)
    mags = np.abs(delta.reshape(-1))
    return ((mags > t) | ((mags == t) & (np.arange(mags.size) <= cut))).reshape(delta.shape)


def inputs(n=3, shape=(6, 5), seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape, np.float32)
    return base, [base + np.float32(0.1) * rng.standard_normal(shape, np.float32) for _ in range(n)]


def close(actual, expected):
    assert actual.dtype == np.float32
    assert_allclose(actual, expected, rtol=1.3e-6, atol=1e-5)


def test_average_and_task_arithmetic_match_their_formulas():
    base, ts = inputs()
    w = [0.5, 1.0, 2.0]
    avg = merge_tensor(MergeOptions(method="average"), "p", base, ts, w)
    close(avg, sum(wi * t for wi, t in zip(w, ts)) / sum(w))
    ta = merge_tensor(MergeOptions(method="task_arithmetic", lambda_=0.7), "p", base, ts, w)
    close(ta, base + 0.7 * sum(wi * (t - base) for wi, t in zip(w, ts)))
    ta_norm = merge_tensor(MergeOptions(method="task_arithmetic", normalize=True), "p", base, ts, w)
    close(ta_norm, base + sum(wi * (t - base) for wi, t in zip(w, ts)) / sum(w))


def test_ties_matches_an_entrywise_formula():
    base, ts = inputs(n=3, shape=(4, 7), seed=1)
    w, density, lam = [1.0, 2.0, 0.5], 0.4, 1.3
    out = merge_tensor(MergeOptions(method="ties", density=density, lambda_=lam), "p", base, ts, w)
    k = int(density * base.size)
    kept = []
    for t in ts:  # top-k by magnitude, written with a full sort
        d = (t - base).reshape(-1)
        keep = np.zeros_like(d)
        keep[np.argsort(-np.abs(d), kind="stable")[:k]] = 1
        kept.append(d * keep)
    expected = np.empty(base.size)
    for e in range(base.size):
        vals = [wi * float(kd[e]) for wi, kd in zip(w, kept)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v, wi) for v, wi in zip(vals, w) if v != 0 and (v > 0) == (sign > 0)]
        total = sum(v for v, _ in agree)
        weight = sum(wi for _, wi in agree) or 1.0
        expected[e] = base.reshape(-1)[e] + lam * total / weight
    close(out, expected.reshape(base.shape))


def test_dare_drops_with_the_density_and_rescales_survivors():
    base = np.zeros((200, 200), np.float32)
    ts = [np.ones((200, 200), np.float32)]
    out = merge_tensor(MergeOptions(method="dare_linear", density=0.25, seed=3), "p", base, ts, [1.0])
    kept = out != 0
    assert abs(kept.mean() - 0.25) < 0.01
    assert np.all(out[kept] == 4.0)  # 1 / density
    again = merge_tensor(MergeOptions(method="dare_linear", density=0.25, seed=3), "p", base, ts, [1.0])
    other = merge_tensor(MergeOptions(method="dare_linear", density=0.25, seed=4), "p", base, ts, [1.0])
    assert np.array_equal(out, again) and not np.array_equal(out, other)
    # dare_ties: opposite signs at density 1 -> the larger mass wins, the other is not averaged in
    f = lambda *v: np.array(v, np.float32)  # noqa: E731
    ties = merge_tensor(MergeOptions(method="dare_ties"), "p", np.zeros(3, np.float32), [f(1, -1, 2), f(-3, -2, 1)], [1.0, 1.0])
    close(ties, f(-3, -3, 3))


def test_lambda_is_accepted_under_its_yaml_name():
    assert MergeOptions(**{"method": "ties", "lambda": 0.5}).lambda_ == 0.5


@pytest.mark.parametrize("method, given, message", [
    ("average", {"density": 0.5}, "density does not apply to average; it reads: normalize"),
    ("average", {"lambda": 2.0, "seed": 1}, "lambda, seed do not apply to average; it reads: normalize"),
    ("task_arithmetic", {"density": 0.5}, "density does not apply to task_arithmetic; it reads: lambda, normalize"),
    ("ties", {"seed": 3}, "seed does not apply to ties; it reads: density, lambda, normalize"),
    ("ties", {"gamma": 0.1}, "gamma does not apply to ties; it reads: density, lambda, normalize"),
    ("breadcrumbs", {"seed": 1}, "seed does not apply to breadcrumbs; it reads: density, gamma, lambda, normalize"),
    ("model_stock", {"normalize": True, "t": 0.5}, "normalize, t do not apply to model_stock; it reads: filter_wise"),
    ("slerp", {"t": 0.5, "density": 0.5}, "density does not apply to slerp; it reads: t"),
    ("average", {"filter_wise": True}, "filter_wise does not apply to average; it reads: normalize"),
    ("slerp", {}, "slerp needs t, its interpolation from the base at 0 to the input at 1, as in mergekit"),
])  # fmt: skip
def test_a_parameter_the_method_does_not_read_is_refused_when_the_options_are_built(method, given, message):
    from pydantic import ValidationError

    from cairn.errors import ConfigError

    with pytest.raises(ValidationError, match=message):
        MergeOptions(method=method, **given)
    with pytest.raises(ConfigError) as err:
        MergeOptions.parse("invalid merge option", method=method, **given)
    assert str(err.value) == f"invalid merge option: {message}" and err.value.exit_code == 4


def test_a_merge_strategy_with_a_parameter_its_method_does_not_read_is_refused_when_the_config_is_read():
    from cairn.config import QUICKSTART, parse_config
    from cairn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"strategies\.0: strategy 'm' \(merge\): density does not apply to average; it reads: normalize$"):
        parse_config({**QUICKSTART, "strategies": [{"name": "m", "kind": "merge", "method": "average", "density": 0.5}]})


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "model_stock", "slerp"])
def test_every_method_takes_the_parameters_it_reads_its_defaults_and_its_saved_options(method):
    from cairn.options import MERGE_METHODS
    from cairn.validation import SAVED

    spec = MERGE_METHODS[method]
    reads = {"density": 0.5, "gamma": 0.02, "lambda": 0.8, "seed": 4, "t": 0.3, "filter_wise": True}
    opts = MergeOptions(method=method, **({"normalize": False} if spec.normalize is not None else {}), **{k: v for k, v in reads.items() if k in spec.reads})
    assert MergeOptions(**opts.model_dump()) == opts == MergeOptions(**opts.model_dump(by_alias=True))  # a dump reads back
    assert MergeOptions.model_validate({"method": method, **reads}, context=SAVED).density == 0.5  # as saved, unchecked
    defaults = MergeOptions(method=method, **({"t": 0.5} if method == "slerp" else {})).kwargs()
    assert (defaults["density"], defaults["gamma"], defaults["filter_wise"]) == (1.0, 0.01, False)  # the defaults are every method's (mergekit's)
    with pytest.raises(ValueError, match="allowed: method, density, gamma, lambda"):
        MergeOptions(method="ties", lamda=0.5)


@pytest.mark.parametrize("density", [1e-6, 0.2, 0.5, 0.999999])
def test_magnitude_threshold_and_count_are_exact_on_large_tensors(density):
    theta = np.random.default_rng(0).standard_normal(3_000_000, np.float32)
    theta[:200_000] = theta[0]  # many exact ties
    k = max(1, int(density * theta.size))
    t, _ = magnitude_threshold(np.zeros_like(theta), theta, density)
    assert t == np.partition(np.abs(theta), theta.size - k)[theta.size - k]
    kept = magnitude_mask(theta, density)
    assert int(kept.sum()) == k
    assert np.all(np.abs(theta)[kept] >= t) and np.all(np.abs(theta)[~kept] <= t)


def test_merge_kernels_run_on_sleeping_threads(tmp_path):
    """numba's OpenMP layer left a pool thread spinning that made single-threaded torch training
    after a merge up to ~9x slower; the kernels must run on the workqueue layer, whose threads
    sleep, also in a fresh process where they compile."""
    script = (
        "import numpy as np, numba\n"
        "from cairn.methods.merge.methods import magnitude_threshold\n"
        "theta = np.random.default_rng(0).standard_normal(300_000, np.float32)\n"
        "magnitude_threshold(np.zeros_like(theta), theta, 0.5)\n"
        "print(numba.threading_layer())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)  # an empty cache: the kernels compile
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "workqueue"


def test_magnitude_mask_keeps_exactly_k_with_ties_to_lower_indices():
    mask = magnitude_mask(np.array([1.0, -1.0, 1.0, 0.5], np.float32), 0.5)
    assert mask.tolist() == [True, True, False, False]
    assert magnitude_mask(np.random.default_rng(1).standard_normal((10, 10), np.float32), 0.37).sum() == 37


def test_non_float_tensors_come_from_the_base():
    base = np.arange(5)
    assert np.array_equal(merge_tensor(MergeOptions(method="ties"), "p", base, [base + 1], [1.0]), base)


def test_bfloat16_conversion_matches_torch():
    values = torch.cat([torch.randn(10_000) * 10.0 ** torch.randint(-30, 30, (10_000,)),
                        torch.tensor([0.0, -0.0, 1.00390625, 1.01171875, 3.4e38, float("inf"), float("-inf"), float("nan")])])  # fmt: skip
    bits = to_storage(values.numpy(), "BF16")
    assert STORAGE["BF16"] == bits.dtype.type
    expected = values.to(torch.bfloat16)
    number = ~values.isnan().numpy()  # a NaN stays a NaN; its payload bits are torch's own choice
    assert np.array_equal(bits[number], expected.view(torch.int16).numpy().view(np.uint16)[number])
    assert np.array_equal(bf16_to_float32(bits), expected.float().numpy(), equal_nan=True)


# --- on disk -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny):
    """The tiny-random base folder, two LoRA adapters of it, and the full models they stand for."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cairn.models import resolve_folder

    root = tmp_path_factory.mktemp("merge")
    base_dir = resolve_folder("tiny-random")
    adapters, fulls = [], []
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        model.save_pretrained(root / f"adapter{i}")
        model.merge_and_unload().save_pretrained(root / f"full{i}")
        fulls.append(root / f"full{i}")
        adapters.append(root / f"adapter{i}")
    return base_dir, adapters, fulls


def state(folder):
    from safetensors.numpy import load_file

    return load_file(f"{folder}/model.safetensors")


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_adapter_deltas_merge_like_the_full_models_they_stand_for(folders, tmp_path, method):
    base_dir, adapters, fulls = folders
    opts = MergeOptions(method=method, **({"density": 0.5} if method == "ties" else {}))
    merge_models(base_dir, adapters, tmp_path / "from-adapters", opts, progress=False, made_from=MADE_FROM)
    merge_models(base_dir, fulls, tmp_path / "from-full", opts, progress=False, made_from=MADE_FROM)
    a, f = state(tmp_path / "from-adapters"), state(tmp_path / "from-full")
    assert a.keys() == f.keys()
    for k in a:
        assert_allclose(a[k], f[k], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("method, normalize", [("ties", None), ("average", None), ("average", False)])
def test_tensors_no_adapter_touches_merge_as_the_full_models_would(folders, tmp_path, method, normalize):
    """They skip the arithmetic where the merge of equal inputs is the base; an unnormalized
    average (the sum of the inputs) still computes them."""
    base_dir, adapters, fulls = folders
    opts = MergeOptions(method=method, normalize=normalize)
    merge_models(base_dir, adapters, tmp_path / "a", opts, progress=False, made_from=MADE_FROM)
    merge_models(base_dir, fulls, tmp_path / "f", opts, progress=False, made_from=MADE_FROM)
    a, f, base = state(tmp_path / "a"), state(tmp_path / "f"), state(base_dir)
    untouched = [k for k in base if all(np.array_equal(state(full)[k], base[k]) for full in fulls)]
    assert "model.embed_tokens.weight" in untouched and len(untouched) < len(base)
    for k in untouched:
        assert_allclose(a[k], f[k], atol=2e-6, rtol=1e-5)
        if opts.keeps_the_base():
            assert np.array_equal(a[k], base[k])
    assert opts.keeps_the_base() == (normalize is None)
    if not opts.keeps_the_base():
        assert_allclose(a["model.embed_tokens.weight"], len(adapters) * base["model.embed_tokens.weight"], rtol=1e-6)


def test_streaming_merge_equals_the_in_memory_merge(folders, tmp_path):
    base_dir, adapters, fulls = folders
    opts = MergeOptions(method="ties", density=0.3, lambda_=0.9)
    merge_models(base_dir, [fulls[0], adapters[1]], tmp_path / "out", opts, weights=[1.0, 0.5], progress=False, made_from=MADE_FROM)
    base, t0, t1 = state(base_dir), state(fulls[0]), state(fulls[1])
    out = state(tmp_path / "out")
    assert out.keys() == base.keys()
    for k in base:
        assert_allclose(out[k], merge_tensor(opts, k, base[k], [t0[k], t1[k]], [1.0, 0.5]), atol=2e-6, rtol=1e-5)
    manifest = json.loads((tmp_path / "out" / "cairn.json").read_text())
    assert manifest["merge"]["method"] == "ties" and "model.safetensors" in manifest["files"]
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_merged_folder_loads_and_the_svd_adapter_reconstructs_it(folders, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapters, _ = folders
    opts = MergeOptions(method="task_arithmetic")
    merge_models(base_dir, adapters, tmp_path / "full", opts, progress=False, made_from=MADE_FROM)
    stats = merge_models(base_dir, adapters, tmp_path / "lora", opts, adapter_rank=8, progress=False, made_from=MADE_FROM)
    assert stats["svd"]["relative_error"] < 1e-4  # two rank-4 deltas: rank 8 is exact
    low = merge_models(base_dir, adapters, tmp_path / "lora2", opts, adapter_rank=2, progress=False, made_from=MADE_FROM)
    assert 0.05 < low["svd"]["relative_error"] < 1
    x = torch.tensor([[1, 5, 9, 13, 17]])
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "lora")
    torch.testing.assert_close(lora(x).logits, full(x).logits, atol=1e-4, rtol=1e-4)


def test_cli_merge_and_its_errors(folders, tmp_path, capsys):
    base_dir, adapters, fulls = folders
    out = tmp_path / "m"
    assert main(["merge", "--method", "ties", "--base", str(base_dir), "--inputs", *map(str, fulls), "--density", "0.5", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["merge", "--method", "average", "--base", str(base_dir), "--inputs", str(fulls[0]), "--density", "0.5", "--out", str(out)]) == 4
    assert "density does not apply to average; it reads: normalize" in capsys.readouterr().err
    assert main(["merge", "--method", "ties", "--base", str(base_dir), "--inputs", str(fulls[0]), "--weights", "1", "2", "--out", str(out)]) == 5
    assert "2 weights for 1 inputs" in capsys.readouterr().err
    assert main(["merge", "--method", "ties", "--base", str(base_dir), "--inputs", "nope", "--out", str(out), "--store", str(tmp_path / "s")]) == 4
    assert "neither a folder nor a contribution" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()  # failed merges left the earlier output intact


def test_cli_merge_takes_store_ids_and_refuses_another_base(tmp_path, capsys):
    store, other = stored_contribution(tmp_path)
    args = ["merge", "--method", "average", "--inputs", "mine", "--store", str(store)]
    assert main([*args, "--base", "tiny-random", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main([*args, "--base", str(other), "--out", str(tmp_path / "m2")]) == 5
    assert "was made on a base with fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_cli_merge_takes_a_mergekit_config(folders, tmp_path, capsys):
    import yaml
    from transformers import AutoModelForCausalLM

    from cairn.weights.tensor_files import FolderWeights, stored

    base_dir, _, fulls = folders
    config = {
        "merge_method": "ties", "base_model": str(base_dir), "dtype": "bfloat16",
        "models": [{"model": str(fulls[0]), "parameters": {"weight": 1.0, "density": 0.5}}, {"model": str(fulls[1]), "parameters": {"weight": 0.5, "density": 0.5}}],
        "parameters": {"lambda": 0.9},
    }  # fmt: skip
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", "--config", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "out")]) == 0
    opts = MergeOptions(method="ties", density=0.5, lambda_=0.9)
    merge_models(base_dir, fulls, tmp_path / "direct", opts, weights=[1.0, 0.5], progress=False, made_from=MADE_FROM)
    out, direct = FolderWeights(tmp_path / "out"), FolderWeights(tmp_path / "direct")
    name = "model.layers.0.mlp.down_proj.weight"
    assert out.meta(name)[0] == "BF16" and direct.meta(name)[0] == "F32"
    assert np.array_equal(out.get(name), stored(direct.get(name), "BF16"))  # the same merge, rounded to bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    assert main(["merge", "--config", str(tmp_path / "mk.yml"), "--method", "ties", "--out", str(tmp_path / "x")]) == 4
    assert "--config gives the whole merge; drop --method" in capsys.readouterr().err
    assert main(["merge", "--base", str(base_dir), "--out", str(tmp_path / "x")]) == 4
    assert "cairn merge needs --method, --inputs (or a mergekit YAML through --config)" in capsys.readouterr().err


# --- mergekit's newer methods against slow transcriptions of their formulas ------------------------


def breadcrumbs_oracle(base, ts, w, density, gamma, lam, normalize, elect):
    """Per task vector: rank the entries by |τ| (ties to the lower index), drop the top
    int(gamma n) and keep the int(density n) next (mergekit's counts); then a plain or TIES sum."""
    n = base.size
    kept = []
    for t in ts:
        d = (t - base).reshape(-1).astype(np.float64)
        if density >= 1:
            kept.append(d)
            continue
        k, m = int(density * n), int(gamma * n)
        bottom = n - k - m
        if bottom < 0:
            m, bottom = m + bottom, 0
        order = np.lexsort((np.arange(n), -np.abs(d)))  # descending |τ|, then ascending index
        keep = np.zeros(n)
        keep[order[m:m + k]] = 1
        assert keep.sum() == min(k, n - m) and n - bottom - m == k
        kept.append(d * keep)
    out = np.empty(n)
    for e in range(n):
        vals = [wi * kd[e] for wi, kd in zip(w, kept)]
        if elect:
            sign = 1.0 if sum(vals) >= 0 else -1.0
            agree = [(v, wi) for v, wi in zip(vals, w) if v != 0 and (v > 0) == (sign > 0)]
            total, weight = sum(v for v, _ in agree), sum(wi for _, wi in agree) or 1.0
        else:
            total, weight = sum(vals), sum(w)
        out[e] = base.reshape(-1)[e] + lam * (total / weight if normalize else total)
    return out.reshape(base.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density, gamma, normalize", [(0.5, 0.1, False), (0.3, 0.01, None), (0.8, 0.4, True), (0.6, 0.0, False), (1.0, 0.3, False)])
def test_breadcrumbs_drop_the_outliers_and_the_smallest_as_an_entrywise_formula(method, density, gamma, normalize):
    base, ts = inputs(n=3, shape=(12, 25), seed=5)
    w, lam = [1.0, 2.0, 0.5], 0.9
    out = merge_tensor(MergeOptions(method=method, density=density, gamma=gamma, lambda_=lam, normalize=normalize), "p", base, ts, w)
    close(out, breadcrumbs_oracle(base, ts, w, density, gamma, lam, bool(normalize), method == "breadcrumbs_ties"))


def test_breadcrumbs_with_gamma_0_is_the_magnitude_pruning_and_density_1_keeps_everything():
    base, ts = inputs(n=3, shape=(16, 20), seed=6)
    w = [1.0, 0.5, 2.0]
    crumbs = merge_tensor(MergeOptions(method="breadcrumbs_ties", density=0.4, gamma=0.0), "p", base, ts, w)
    assert np.array_equal(crumbs, merge_tensor(MergeOptions(method="ties", density=0.4, normalize=False), "p", base, ts, w))
    pruned = [base + (t - base) * magnitude_mask(t - base, 0.4) for t in ts]
    close(merge_tensor(MergeOptions(method="breadcrumbs", density=0.4, gamma=0.0), "p", base, ts, w), base + sum(wi * (p - base) for wi, p in zip(w, pruned)))
    everything = merge_tensor(MergeOptions(method="breadcrumbs", density=1.0, gamma=0.2), "p", base, ts, w)
    assert np.array_equal(everything, merge_tensor(MergeOptions(method="task_arithmetic"), "p", base, ts, w))
    outliers = merge_tensor(MergeOptions(method="breadcrumbs", density=0.5, gamma=0.2), "p", base, ts, [1.0, 0.0, 0.0]) - base
    tau = (ts[0] - base).reshape(-1)
    kept = outliers.reshape(-1) != 0
    assert kept.sum() == int(0.5 * base.size)
    assert np.abs(tau[~kept]).max() > np.abs(tau[kept]).max() and np.abs(tau[kept]).min() > np.sort(np.abs(tau))[base.size // 10]


def model_stock_oracle(base, ts, filter_wise):
    b = torch.tensor(base, dtype=torch.float64)
    ws = [torch.tensor(t, dtype=torch.float64) for t in ts]
    if filter_wise and b.dim() >= 2:
        rows = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731
    taus = [rows(w) - rows(b) for w in ws]
    n = len(ws)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = (taus[i].norm(dim=-1) * taus[j].norm(dim=-1)).clamp(min=1e-6)
            cos.append(((taus[i] * taus[j]).sum(-1) / denom).clamp(-1, 1))
    c = torch.stack(cos).mean(0)[:, None]
    denominator = 1 + (n - 1) * c
    t = torch.where(denominator.abs() < 1e-6, 0.0, n * c / denominator)
    return (t * rows(sum(ws) / n) + (1 - t) * rows(b)).reshape(b.shape).numpy()


@pytest.mark.parametrize("n, shape, filter_wise", [(2, (9, 7), False), (3, (9, 7), True), (4, (30,), True), (3, (2, 3, 5), False), (3, (2, 3, 5), True)])
def test_model_stock_matches_its_formula_over_pairs_of_task_vectors(n, shape, filter_wise):
    base, ts = inputs(n=n, shape=shape, seed=7)
    ts = [t + np.float32(0.05) * (ts[0] - base) for t in ts]  # correlated task vectors: 0 < cos < 1
    out = merge_tensor(MergeOptions(method="model_stock", filter_wise=filter_wise), "p", base, ts, [1.0] * n)
    close(out, model_stock_oracle(base, ts, filter_wise))
    assert not np.allclose(out, sum(ts) / n) and not np.allclose(out, base)


def test_model_stock_of_identical_inputs_is_that_input_and_of_base_copies_the_base():
    base, ts = inputs(n=1, shape=(8, 8), seed=8)
    close(merge_tensor(MergeOptions(method="model_stock"), "p", base, [ts[0]] * 3, [1.0] * 3), ts[0])
    assert np.array_equal(merge_tensor(MergeOptions(method="model_stock", filter_wise=True), "p", base, [base, base], [1.0, 1.0]), base)
    from cairn.errors import ConfigError

    opposite = [ts[0], 2 * base - ts[0]]  # cos = -1: 1 + (N - 1) cos = 0, no finite ratio
    assert np.array_equal(merge_tensor(MergeOptions(method="model_stock"), "p", base, opposite, [1.0, 1.0]), base)
    with pytest.raises(ConfigError, match="model_stock reads no weights"):
        merge_tensor(MergeOptions(method="model_stock"), "p", base, [ts[0]] * 2, [1.0, 2.0])
    with pytest.raises(ConfigError, match="model_stock needs at least 2 inputs"):
        merge_tensor(MergeOptions(method="model_stock"), "p", base, ts, [1.0])


def slerp_oracle(t, v0, v1):
    a, b = v0.astype(np.float64).reshape(-1), v1.astype(np.float64).reshape(-1)
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    if abs(cos) > 0.9995:
        return ((1 - t) * v0.astype(np.float64) + t * v1.astype(np.float64))
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * v0.astype(np.float64) + np.sin(t * omega) * v1.astype(np.float64)) / np.sin(omega)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0, 1.3])
def test_slerp_follows_the_arc_between_the_base_and_the_input(t):
    rng = np.random.default_rng(9)
    base, other = rng.standard_normal((6, 11), np.float32), rng.standard_normal((6, 11), np.float32)
    out = merge_tensor(MergeOptions(method="slerp", t=t), "p", base, [other], [1.0])
    close(out, slerp_oracle(t, base, other))
    if t in (0.0, 1.0):
        close(out, base if t == 0 else other)
    near = base + np.float32(1e-3) * other  # nearly colinear with the base: the linear interpolation
    close(merge_tensor(MergeOptions(method="slerp", t=t), "p", base, [near], [1.0]), (1 - t) * base + t * near)


def test_slerp_takes_one_input_and_no_weights():
    from cairn.errors import ConfigError

    base, ts = inputs(n=2)
    with pytest.raises(ConfigError, match="slerp interpolates the base and one input"):
        merge_tensor(MergeOptions(method="slerp", t=0.5), "p", base, ts, [1.0, 1.0])
    with pytest.raises(ConfigError, match="slerp reads no weights"):
        merge_tensor(MergeOptions(method="slerp", t=0.5), "p", base, ts[:1] * 2, [1.0, 3.0])


@pytest.mark.parametrize("method, extra, n", [("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, 2), ("model_stock", {"filter_wise": True}, 2), ("slerp", {"t": 0.4}, 1)])
def test_the_new_methods_merge_adapter_deltas_like_the_full_models_they_stand_for(folders, tmp_path, method, extra, n):
    base_dir, adapters, fulls = folders
    opts = MergeOptions(method=method, **extra)
    merge_models(base_dir, adapters[:n], tmp_path / "from-adapters", opts, progress=False, made_from=MADE_FROM)
    merge_models(base_dir, fulls[:n], tmp_path / "from-full", opts, progress=False, made_from=MADE_FROM)
    a, f, base = state(tmp_path / "from-adapters"), state(tmp_path / "from-full"), state(base_dir)
    assert a.keys() == f.keys()
    for k in a:
        assert_allclose(a[k], f[k], atol=2e-6, rtol=1e-5)
    assert not np.allclose(a["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    assert np.array_equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # no adapter touches it


def test_cli_merge_runs_the_new_methods_and_a_mergekit_slerp_config(folders, tmp_path, capsys):
    import yaml

    base_dir, _, fulls = folders
    for method, options, extra in [("breadcrumbs", ["--density", "0.5"], {"density": 0.5}), ("model_stock", [], {})]:
        out = tmp_path / method
        assert main(["merge", "--method", method, "--base", str(base_dir), "--inputs", *map(str, fulls), *options, "--out", str(out)]) == 0
        merge_models(base_dir, fulls, tmp_path / f"{method}-direct", MergeOptions(method=method, **extra), progress=False, made_from=MADE_FROM)
        got, direct = state(out), state(tmp_path / f"{method}-direct")
        assert all(np.array_equal(got[k], direct[k]) for k in direct)
    assert main(["merge", "--method", "model_stock", "--base", str(base_dir), "--inputs", *map(str, fulls), "--weights", "1", "2", "--out", str(tmp_path / "x")]) != 0
    assert "model_stock reads no weights" in capsys.readouterr().err
    config = {"merge_method": "slerp", "base_model": str(base_dir), "models": [{"model": str(base_dir)}, {"model": str(fulls[1])}], "parameters": {"t": 0.3}, "dtype": "float32"}
    (tmp_path / "slerp.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", "--config", str(tmp_path / "slerp.yml"), "--out", str(tmp_path / "slerp")]) == 0
    got, base, other = state(tmp_path / "slerp"), state(base_dir), state(fulls[1])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert_allclose(got[name], slerp_oracle(0.3, base[name], other[name]), rtol=1e-5, atol=1e-6)


def test_cli_merge_passes_slerps_t_breadcrumbs_gamma_and_model_stocks_filter_wise(folders, tmp_path, capsys):
    from cairn.manifest import read_manifest

    base_dir, _, fulls = folders
    common = ["--base", str(base_dir), "--out"]
    assert main(["merge", "--method", "slerp", "--inputs", str(fulls[0]), "--t", "0.3", *common, str(tmp_path / "s")]) == 0
    assert read_manifest(tmp_path / "s")["merge"]["options"]["t"] == 0.3
    assert main(["merge", "--method", "breadcrumbs", "--inputs", *map(str, fulls), "--density", "0.5", "--gamma", "0.05", *common, str(tmp_path / "b")]) == 0
    assert read_manifest(tmp_path / "b")["merge"]["options"]["gamma"] == 0.05
    assert main(["merge", "--method", "model_stock", "--inputs", *map(str, fulls), "--filter-wise", *common, str(tmp_path / "m")]) == 0
    assert read_manifest(tmp_path / "m")["merge"]["options"]["filter_wise"] is True
    assert main(["merge", "--method", "ties", "--inputs", *map(str, fulls), "--t", "0.5", *common, str(tmp_path / "x")]) == 4
    assert "t does not apply to ties" in capsys.readouterr().err
