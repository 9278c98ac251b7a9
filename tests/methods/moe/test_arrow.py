"""The arrow router is PEFT's Arrow: the same logits as create_arrow_model, GenKnowSub included,
and a mixture that saves and loads back."""

import pytest
import torch
from peft import ArrowConfig, create_arrow_model

from cairn.errors import ModelError
from cairn.methods.moe.arrow import arrow_layers, arrow_weights
from cairn.methods.moe.lora_moe import attach_experts, save_moe
from cairn.models import fingerprint
from cairn.options import MoeOptions
from conftest import MADE_FROM
from lora_adapters import fresh_base, three_experts  # noqa: F401 (fixtures)

X = torch.tensor([[1, 5, 9, 13, 17, 21], [3, 8, 2, 40, 7, 11]])


def peft_arrow(base, folders, general=None, **config):
    model = create_arrow_model(base, [str(f) for f in folders], ArrowConfig(rng_seed=0, use_gks=general is not None, **config),
                               general_adapter_paths=None if general is None else [str(g) for g in general])  # fmt: skip
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(X).logits


def test_the_arrow_mixture_has_the_logits_of_peft_create_arrow_model(three_experts, fresh_base):
    folders, _ = three_experts
    ours = attach_experts(fresh_base(), folders, MoeOptions(router="arrow", top_k=2, temperature=0.5))
    theirs = peft_arrow(fresh_base(), folders, top_k=2, router_temperature=0.5)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(ours), logits(fresh_base()), atol=1e-3)  # the experts do act
    assert ours.config.cairn_moe["router"] == "arrow" and ours.reads_whole_prompt is False


def test_arrow_defaults_are_peft_temperature_and_a_top_k_capped_at_the_experts(three_experts, fresh_base):
    folders, _ = three_experts
    ours = attach_experts(fresh_base(), folders[:2], MoeOptions(router="arrow", top_k=5))
    layer = next(iter(arrow_layers(ours).values()))
    assert (layer.top_k, layer.temperature, layer.rng_seed) == (2, 1.0, 0)
    torch.testing.assert_close(logits(ours), logits(peft_arrow(fresh_base(), folders[:2], top_k=2)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("general", ["mean", "path"])
def test_genknowsub_subtracts_the_general_adapter_as_peft_does(three_experts, fresh_base, general):
    folders, extra = three_experts
    given = "mean" if general == "mean" else str(extra)
    ours = attach_experts(fresh_base(), folders, MoeOptions(router="arrow", general=given))
    theirs = peft_arrow(fresh_base(), folders, general=folders if general == "mean" else [extra], top_k=2)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-5, rtol=1e-5)
    plain = attach_experts(fresh_base(), folders, MoeOptions(router="arrow"))
    assert not torch.allclose(logits(ours), logits(plain), atol=1e-4)  # the subtraction changed the experts


def test_arrow_weights_are_the_coefficients_peft_mixes_the_experts_with(three_experts, fresh_base):
    folders, _ = three_experts
    model = attach_experts(fresh_base(), folders, MoeOptions(router="arrow", temperature=0.3))
    logits(model)  # PEFT builds its prototypes on the first forward pass
    host = model.get_base_model().get_submodule("model.layers.1.mlp.down_proj")
    layer = arrow_layers(model)["model.layers.1.mlp.down_proj"]
    x = torch.randn(5, host.in_features)
    w = arrow_weights(layer, x)
    names = layer.task_adapter_names
    deltas = torch.stack([host.scaling[n] * x @ (host.lora_B[n].weight @ host.lora_A[n].weight).T for n in names], 1)
    with torch.no_grad():
        torch.testing.assert_close(host(x), host.base_layer(x) + (w.unsqueeze(-1) * deltas).sum(1), atol=1e-5, rtol=1e-5)
    assert ((w > 0).sum(-1) == 2).all()  # top 2 of 3


def test_an_arrow_mixture_saves_and_loads_back_its_general_adapter_included(three_experts, fresh_base, tmp_path):
    import shutil

    from cairn.contributions import load

    folders, extra = three_experts
    general = tmp_path / "general"
    shutil.copytree(extra, general)
    opts = MoeOptions(router="arrow", general=str(general), top_k=1)
    mixed = attach_experts(fresh_base(), folders, opts)
    save_moe(mixed, folders, opts, tmp_path / "mix", made_from={**MADE_FROM, "base_fingerprint": fingerprint(fresh_base())})  # loading checks it
    shutil.rmtree(general)  # the saved mixture holds its own copy
    assert not (tmp_path / "mix" / "router.safetensors").exists()  # PEFT rebuilds the router from the experts
    loaded, _ = load(str(tmp_path / "mix"))
    torch.testing.assert_close(logits(loaded), logits(mixed), atol=1e-6, rtol=1e-6)


def test_arrow_refuses_experts_of_different_ranks_and_a_general_that_is_not_an_adapter(three_experts, fresh_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    folders, _ = three_experts
    get_peft_model(fresh_base(), LoraConfig(r=2, target_modules="all-linear")).save_pretrained(tmp_path / "r2")
    with pytest.raises(ModelError, match="router arrow \\(PEFT's Arrow\\) cannot mix .*r2.*rank mismatch"):
        attach_experts(fresh_base(), [folders[0], tmp_path / "r2"], MoeOptions(router="arrow"))
    with pytest.raises(ModelError, match="general: .*nowhere is not a LoRA adapter folder"):
        attach_experts(fresh_base(), folders, MoeOptions(router="arrow", general=str(tmp_path / "nowhere")))


@pytest.mark.parametrize("options, message", [
    ({"router": "arrow", "granularity": "sequence"}, "granularity: sequence does not apply to router arrow: PEFT's Arrow routes each token"),
    ({"router": "centroid", "general": "mean"}, "general does not apply to router centroid: only the arrow router reads it"),
])  # fmt: skip
def test_arrow_options_that_peft_arrow_cannot_honour_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        MoeOptions(**options)


def test_arrow_routes_per_token_whether_or_not_granularity_is_given():
    assert MoeOptions(router="arrow").granularity == "token" == MoeOptions(router="arrow", granularity="token").granularity
    saved = MoeOptions(router="arrow", general="mean").model_dump()
    assert MoeOptions(**saved) == MoeOptions(router="arrow", general="mean")  # as load_moe reads moe.json


def test_cli_mix_with_arrow_takes_general_and_refuses_sequence_routing(three_experts, tmp_path, capsys):
    import json

    from cairn.cli import main

    folders, _ = three_experts
    args = ["mix", "--base", "tiny-random", "--inputs", *map(str, folders), "--router", "arrow"]
    assert main([*args, "--general", "mean", "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "moe.json").read_text())["options"]["general"] == "mean"
    assert main([*args, "--granularity", "sequence", "--out", str(tmp_path / "m2")]) == 4
    assert "granularity: sequence does not apply to router arrow" in capsys.readouterr().err
