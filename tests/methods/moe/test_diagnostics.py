"""Diagnostics of a mixture: its experts' prototype similarity, and how often it routes each
expert's prompts to that expert."""

import shutil

import pytest
import torch

from cairn.errors import DataError, ModelError
from cairn.methods.moe import statistics
from cairn.methods.moe.diagnostics import prototype_similarity, prototypes, routing_accuracy
from cairn.methods.moe.lora_moe import attach_experts
from cairn.options import MoeOptions
from cairn.weights.adapters import read_lora
from lora_adapters import fresh_base, three_experts  # noqa: F401 (fixtures)

PROMPTS = [[f"The capital of Zorland number {i} is" for i in range(6)], [f"def function_{i}(x):\n    return" for i in range(6)]]


def exact_prototype(folder, module, minus=None):
    a, b, _, _ = read_lora(folder)[module]
    a, b = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    if minus is not None:
        a, b = a - minus[0], b - minus[1]
    return torch.linalg.svd(b @ a).Vh[0]


def test_identical_experts_have_parallel_prototypes_at_every_layer(three_experts):
    folders, _ = three_experts
    sim = prototype_similarity([folders[0], folders[0]])
    assert sim["mean_abs_cos"] == pytest.approx(1.0, abs=1e-4) and sim["share_above_0.5"] == 1.0
    assert sim["by_layer"] == {"0": pytest.approx(1.0, abs=1e-4), "1": pytest.approx(1.0, abs=1e-4)}


def test_prototype_similarity_is_the_mean_abs_cosine_of_the_deltas_top_singular_vectors(three_experts):
    folders, _ = three_experts
    modules = sorted(read_lora(folders[0]))
    cos = torch.tensor([[abs(float(exact_prototype(folders[i], m) @ exact_prototype(folders[j], m))) for i, j in ((0, 1), (0, 2), (1, 2))] for m in modules])
    sim = prototype_similarity(folders)
    assert sim["mean_abs_cos"] == pytest.approx(float(cos.mean()), abs=1e-4)
    assert sim["share_above_0.5"] == pytest.approx(float((cos > 0.5).double().mean()), abs=1e-4)
    layer0 = [k for k, m in enumerate(modules) if ".layers.0." in m]
    assert sim["by_layer"]["0"] == pytest.approx(float(cos[layer0].mean()), abs=1e-4)


def test_genknowsub_prototypes_are_those_of_the_experts_minus_the_mean_factors(three_experts):
    folders, _ = three_experts
    module = "model.layers.1.mlp.up_proj"
    parts = [read_lora(f)[module] for f in folders]
    mean = (torch.from_numpy(sum(p[0] for p in parts) / 3).double(), torch.from_numpy(sum(p[1] for p in parts) / 3).double())
    got = prototypes(folders, "mean")[module]
    for k in range(3):
        assert abs(float(got[k].double() @ exact_prototype(folders[k], module, mean))) == pytest.approx(1.0, abs=1e-4)


def with_statistics(folder, prompts, dst, base, tokenizer):
    shutil.copytree(folder, dst)
    statistics.save(statistics.input_statistics(base, tokenizer, prompts, sorted(read_lora(folder))), dst, len(prompts))
    return dst


def test_a_centroid_mixture_routes_each_experts_own_prompts_to_it_and_uniform_routes_none(three_experts, fresh_base, tiny, tmp_path):
    folders, _ = three_experts
    model, tokenizer = tiny
    shipped = [with_statistics(folders[k], PROMPTS[k], tmp_path / f"e{k}", model, tokenizer) for k in range(2)]
    centroid = attach_experts(fresh_base(), shipped, MoeOptions(router="centroid", top_k=1))
    assert routing_accuracy(centroid, tokenizer, PROMPTS) == [1.0, 1.0]
    assert routing_accuracy(centroid, tokenizer, PROMPTS[::-1]) == [0.0, 0.0]  # the other expert's prompts
    assert routing_accuracy(attach_experts(fresh_base(), shipped, MoeOptions(router="uniform")), tokenizer, PROMPTS) == [0.0, 0.0]  # ties


def test_arrow_routing_accuracy_averages_over_real_tokens_only(three_experts, fresh_base, tiny):
    folders, _ = three_experts
    _, tokenizer = tiny
    arrow = attach_experts(fresh_base(), folders[:2], MoeOptions(router="arrow", top_k=1))
    prompts = [PROMPTS[0], [p + " and more words here" for p in PROMPTS[1][:3]] + PROMPTS[1][3:]]
    alone = routing_accuracy(arrow, tokenizer, prompts, batch_size=1)
    assert routing_accuracy(arrow, tokenizer, prompts, batch_size=6) == alone  # padding does not count
    assert all(0.0 <= a <= 1.0 for a in alone)
    assert routing_accuracy(attach_experts(fresh_base(), folders[:1], MoeOptions(router="arrow")), tokenizer, PROMPTS[:1]) == [1.0]


def test_routing_accuracy_refuses_what_it_cannot_measure(three_experts, fresh_base, tiny):
    folders, _ = three_experts
    _, tokenizer = tiny
    arrow = attach_experts(fresh_base(), folders[:2], MoeOptions(router="arrow"))
    with pytest.raises(ModelError, match="the mixture has 2 experts, prompts were given for 3"):
        routing_accuracy(arrow, tokenizer, [*PROMPTS, PROMPTS[0]])
    with pytest.raises(DataError, match="expert 1 has no prompts"):
        routing_accuracy(arrow, tokenizer, [PROMPTS[0], []])
    with pytest.raises(ModelError, match="this model routes nothing"):
        routing_accuracy(fresh_base(), tokenizer, PROMPTS)
    with pytest.raises(ModelError, match="prototype similarity compares experts; got 1"):
        prototype_similarity(folders[:1])
