"""Mixtral export: loads with plain transformers, matches Cairn's own MoE forward, routes by centroid."""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import MADE_FROM
from cairn.errors import ModelError
from cairn.methods.moe.mixtral import export_mixtral
from cairn.methods.moe.routing import centroid_router, topk_weights
from mixtral_reference import MoeMLP, reference_model

VOCAB = 128


def tiny_llama(seed=0, **overrides) -> LlamaForCausalLM:
    sizes = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )  # fmt: skip
    config = LlamaConfig(**{**sizes, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_base(model, folder):
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    return folder


@torch.no_grad()
def fine_tune(base, seed, *, mlp_only=False, scale=0.05):
    """A copy of `base` with every (or every MLP) weight perturbed: a stand-in for a full fine-tune."""
    model = tiny_llama(**{k: getattr(base.config, k) for k in ("tie_word_embeddings",)})
    model.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not mlp_only or ".mlp." in name:
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def save_centroids(model, folder, tokens):
    """centroids.safetensors: per layer, the mean over `tokens` of the MLP's input (post-attention norm)."""
    means = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, args, i=i: means.__setitem__(f"model.layers.{i}.mlp.mean", args[0].reshape(-1, args[0].shape[-1]).mean(0)))
        for i, layer in enumerate(model.model.layers)
    ]
    model(tokens)
    for h in hooks:
        h.remove()
    save_file(means, folder / "centroids.safetensors")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base and three fine-tunes, each with centroids over its own slice of the vocabulary."""
    root = tmp_path_factory.mktemp("mixtral")
    base = tiny_llama()
    save_base(base, root / "base")
    tunes = []
    for k in range(3):
        model = fine_tune(base, seed=10 + k)
        model.save_pretrained(root / f"ft{k}")
        save_centroids(model, root / f"ft{k}", torch.arange(k * 40 + 3, k * 40 + 43).reshape(2, 20))
        tunes.append(root / f"ft{k}")
    return root, root / "base", tunes


def load_export(out):
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 40, 77, 100, 3, 64, 12, 90, 33, 2]])


@pytest.mark.parametrize(("router", "top_k", "shared"), [("centroid", 1, "base"), ("centroid", 2, "average"), ("random", 1, "average"), ("random", 2, "base")])
def test_export_loads_as_mixtral_and_matches_cairns_reference(family, tmp_path, caplog, router, top_k, shared):
    _, base, tunes = family
    out = tmp_path / "moe"
    with caplog.at_level(logging.WARNING):
        stats = export_mixtral(base, tunes, out, router=router, top_k=top_k, shared=shared, progress=False, made_from=MADE_FROM)
        mixtral = load_export(out)
    assert not [r for r in caplog.records if "key" in r.getMessage().lower() or "initialized" in r.getMessage()]
    assert (mixtral.config.num_local_experts, mixtral.config.num_experts_per_tok) == (3, top_k)
    assert mixtral.config.rope_parameters["rope_theta"] == 5000.0  # the base's, not Mixtral's default
    ref = reference_model(base, tunes, router=router, top_k=top_k, shared=shared)
    assert isinstance(ref.model.layers[0].mlp, MoeMLP)
    expected = logits(ref, IDS)
    torch.testing.assert_close(logits(mixtral, IDS), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, logits(LlamaForCausalLM.from_pretrained(tunes[0]).eval(), IDS), atol=1e-3)
    manifest = json.loads((out / "cairn.json").read_text())
    assert manifest["kind"] == "model" and manifest["mix"] == stats
    assert (stats["router"], stats["top_k"], stats["shared"], stats["experts"]) == (router, top_k, shared, 3)
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja", "README.md"}


def test_hub_layout_and_the_centroid_gate_in_the_file(family, tmp_path):
    _, base, tunes = family
    out = tmp_path / "moe"
    export_mixtral(base, tunes, out, router="centroid", temperature=0.5, progress=False, made_from=MADE_FROM)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        gate = f.get_tensor("model.layers.1.block_sparse_moe.gate.weight")
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight")
        w2 = f.get_tensor("model.layers.1.block_sparse_moe.experts.2.w2.weight")
    assert not any(".mlp." in n for n in names)
    assert {f"model.layers.0.block_sparse_moe.experts.{k}.w{j}.weight" for k in range(3) for j in (1, 2, 3)} <= names
    tune = LlamaForCausalLM.from_pretrained(tunes[2])
    torch.testing.assert_close(w1, tune.model.layers[1].mlp.gate_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(w2, tune.model.layers[1].mlp.down_proj.weight, rtol=0, atol=0)
    assert gate.shape == (3, 64)
    cs = []
    for t in tunes:
        with safe_open(t / "centroids.safetensors", "pt") as f:
            cs.append(f.get_tensor("model.layers.1.mlp.mean"))
    torch.testing.assert_close(gate, torch.from_numpy(centroid_router(torch.stack(cs).numpy(), 0.5)))
    for k, c in enumerate(cs):  # each fine-tune's own mean hidden state routes to it
        assert int((gate @ c).argmax()) == k


def test_one_input_or_identical_inputs_reproduce_the_fine_tune(tmp_path):
    base = tiny_llama(seed=1, tie_word_embeddings=True)
    save_base(base, tmp_path / "base")
    tune = fine_tune(base, seed=3)
    tune.save_pretrained(tmp_path / "ft")
    save_centroids(tune, tmp_path / "ft", IDS)
    export_mixtral(tmp_path / "base", [tmp_path / "ft"], tmp_path / "one", top_k=1, shared="average", progress=False, made_from=MADE_FROM)
    one = load_export(tmp_path / "one")
    assert one.config.tie_word_embeddings
    torch.testing.assert_close(logits(one, IDS), logits(tune, IDS), atol=1e-5, rtol=1e-5)

    mlp_tune = fine_tune(base, seed=4, mlp_only=True)
    mlp_tune.save_pretrained(tmp_path / "mlp")
    save_centroids(mlp_tune, tmp_path / "mlp", IDS)
    export_mixtral(tmp_path / "base", [tmp_path / "mlp"] * 2, tmp_path / "two", top_k=2, shared="base", progress=False, made_from=MADE_FROM)
    torch.testing.assert_close(logits(load_export(tmp_path / "two"), IDS), logits(mlp_tune, IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_a_hidden_state_at_a_centroid_routes_mainly_to_its_expert(n):
    rng = np.random.default_rng(n)
    common = 20 * rng.standard_normal(64)  # dominates every centroid, as in real hidden states
    centroids = (common + rng.standard_normal((n, 64))).astype(np.float32)
    rows = torch.from_numpy(centroid_router(centroids))
    for k, c in enumerate(torch.from_numpy(centroids)):
        for top_k in (1, 2):
            w = topk_weights(rows @ c, top_k)
            assert int(w.argmax()) == k and w[k] > 0.5
        near = c + 0.1 * torch.from_numpy(rng.standard_normal(64).astype(np.float32))  # nearby, not exact
        assert int((rows @ near).argmax()) == k
    mean = torch.from_numpy(centroids.mean(0))
    assert torch.allclose(rows @ (mean * 3), torch.zeros(n), atol=1e-4)  # the shared component has no say
    lower = torch.from_numpy(centroid_router(centroids, temperature=0.25))
    assert topk_weights(lower @ torch.from_numpy(centroids[0]), 2)[0] > topk_weights(rows @ torch.from_numpy(centroids[0]), 2)[0]
    assert not centroid_router(np.repeat(centroids[:1], 3, axis=0)).any()  # identical experts: equal logits


def test_generate_runs_on_the_export(family, tmp_path):
    _, base, tunes = family
    export_mixtral(base, tunes[:2], tmp_path / "moe", router="uniform", top_k=2, progress=False, made_from=MADE_FROM)
    model = load_export(tmp_path / "moe")
    out = model.generate(IDS[:, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10) and torch.equal(out[:, :4], IDS[:, :4])


def test_errors_are_clear_and_leave_nothing_behind(family, tmp_path):
    root, base, tunes = family
    out = tmp_path / "moe"
    wide = tiny_llama(intermediate_size=96)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ModelError, match=r"wide: tensor .model\.layers\.0\.mlp\.down_proj\.weight. has shape \[64, 96\], the base has \[64, 128\]"):
        export_mixtral(base, [tunes[0], tmp_path / "wide"], out, router="random", progress=False, made_from=MADE_FROM)
    bare = tmp_path / "bare"
    fine_tune(tiny_llama(), seed=5).save_pretrained(bare)
    with pytest.raises(ModelError, match=r"bare/centroids\.safetensors not found.*own training prompts"):
        export_mixtral(base, [tunes[0], bare], out, progress=False, made_from=MADE_FROM)
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ModelError, match=r"model_type 'qwen2' \(Qwen2ForCausalLM\); only Llama-family"):
        export_mixtral(other, tunes, out, progress=False, made_from=MADE_FROM)
    with pytest.raises(ModelError, match="top_k is 3 with 2 experts"):
        export_mixtral(base, tunes[:2], out, top_k=3, progress=False, made_from=MADE_FROM)
    with pytest.raises(ModelError, match="unknown router 'hidden'"):
        export_mixtral(base, tunes, out, router="hidden", progress=False, made_from=MADE_FROM)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".moe")] == []
