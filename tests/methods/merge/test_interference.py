"""Interference of LoRA contributions, from their factors, against dense deltas."""

import math

import numpy as np
import pytest

from cairn.methods.merge.interference import gram, interference


def lora(rng, out=12, inp=10, r=3, scale=2.0):
    return rng.normal(size=(r, inp)).astype(np.float32), rng.normal(size=(out, r)).astype(np.float32), scale, False


def test_identical_deltas_are_fully_aligned():
    one = {"m": lora(np.random.default_rng(0))}
    got = interference([one, one, one])
    assert got["ratio"] == pytest.approx(1.0) and got["orthogonal"] == pytest.approx(1 / math.sqrt(3))
    assert got["by_layer"]["m"]["ratio"] == pytest.approx(1.0)


def test_orthogonal_deltas_give_the_orthogonal_value():
    # disjoint output rows: the deltas are orthogonal whatever their A
    rng = np.random.default_rng(1)
    adapters = []
    for k, norm_scale in enumerate([1.0, 2.0, 0.5]):
        a, b, _, f = lora(rng)
        b[np.arange(12) // 4 != k] = 0
        adapters.append({"m": (a, b, norm_scale, f)})
    got = interference(adapters)
    assert got["ratio"] == pytest.approx(got["orthogonal"], rel=1e-9)
    assert 1 / math.sqrt(3) < got["orthogonal"] < 1  # unequal norms: above 1/√3


def test_ratios_equal_a_dense_computation_over_modules_some_contributions_skip():
    rng = np.random.default_rng(2)
    adapters = [{"q": lora(rng, r=2), "v": lora(rng, r=4, scale=0.5)}, {"q": lora(rng, r=3)}, {"q": lora(rng), "v": lora(rng)}]
    dense = {m: [a[m][2] * a[m][1] @ a[m][0] if m in a else np.zeros((12, 10)) for a in adapters] for m in ("q", "v")}
    got = interference(adapters)
    for m, deltas in dense.items():
        ratio = np.linalg.norm(sum(deltas)) / sum(np.linalg.norm(d) for d in deltas)
        assert got["by_layer"][m]["ratio"] == pytest.approx(ratio, rel=1e-6)
    flat = [np.concatenate([dense[m][k].ravel() for m in dense]) for k in range(3)]
    norms = [np.linalg.norm(f) for f in flat]
    assert got["ratio"] == pytest.approx(np.linalg.norm(sum(flat)) / sum(norms), rel=1e-6)
    assert got["orthogonal"] == pytest.approx(math.sqrt(sum(n * n for n in norms)) / sum(norms), rel=1e-6)
    g = gram([a.get("v") for a in adapters])
    assert g[1].tolist() == [0, 0, 0]  # the second contribution leaves v alone


def test_all_zero_deltas_have_no_ratio():
    a, b, s, f = lora(np.random.default_rng(3))
    assert interference([{"m": (a, b * 0, s, f)}])["ratio"] is None
