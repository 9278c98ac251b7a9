"""della, della_linear, sce, karcher and nuslerp against slow transcriptions of their formulas
(mergekit 0.1.5's semantics), their options, mergekit YAML and `cairn merge`."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from cairn.cli import main
from cairn.errors import ConfigError
from cairn.methods.merge import kernels as K
from cairn.methods.merge.mergekit import plan_from_mergekit
from cairn.methods.merge.methods import merge_tensor, seed_for
from cairn.methods.merge.streaming import merge_models
from cairn.options import MergeOptions
from conftest import MADE_FROM
from tests.methods.merge.test_methods import folders, state  # noqa: F401  (the fixture and reader the other merge tests use)


def inputs(n=3, shape=(6, 5), seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape, np.float32)
    return base, [base + np.float32(scale) * rng.standard_normal(shape, np.float32) for _ in range(n)]


def close(actual, expected, atol=1e-6):
    assert actual.dtype == np.float32
    assert_allclose(actual, expected, rtol=1e-5, atol=atol)


def elect_and_sum(base, taus, w, lam, normalize, elect):
    """TIES's sign election (on the weighted sum, >= 0 counting as +) and sum, entry by entry, or the plain weighted sum."""
    flat = [t.reshape(-1) for t in taus]
    out = np.empty(base.size)
    for e in range(base.size):
        vals = [wi * t[e] for wi, t in zip(w, flat)]
        if elect:
            positive = sum(vals) >= 0
            agree = [(v, wi) for v, wi in zip(vals, w) if (v > 0 if positive else v < 0)]
            total, weight = sum(v for v, _ in agree), sum(wi for _, wi in agree) or 1.0
        else:
            total, weight = sum(vals), (sum(w) if abs(sum(w)) >= 1e-8 else 1.0)
        out[e] = base.reshape(-1)[e] + lam * (total / weight if normalize else total)
    return out.reshape(base.shape)


# ---- della ----------------------------------------------------------------------------------------


def della_oracle(base, ts, w, *, density, epsilon, lam, normalize, elect, seed):
    """Rank |τ| in each row along axis 1 (1 = smallest, ties to the lower index), keep with
    p = density - epsilon + 2 epsilon (rank - 1) / (m - 1) using the kernel's draw for (seed,
    input, flat entry), rescale to the L1 norm of τ, then elect (or not) and sum."""
    taus = []
    for i, t in enumerate(ts):
        tau = (t.astype(np.float64) - base.astype(np.float64)).reshape(base.shape[0], -1)
        kept = np.zeros_like(tau)
        rows, m = tau.shape
        for r in range(rows):
            order = sorted(range(m), key=lambda c: (abs(tau[r, c]), c))
            for rank0, c in enumerate(order):
                p = density - epsilon + 2 * epsilon * rank0 / (m - 1)
                if K._uniform(np.uint64(seed), np.uint64(i), np.uint64(r * m + c)) < p:
                    kept[r, c] = tau[r, c]
        kept *= np.abs(tau).sum() / np.abs(kept).sum()
        taus.append(kept.reshape(base.shape))
    return elect_and_sum(base, taus, w, lam, normalize, elect)


@pytest.mark.parametrize("method, density, epsilon, lam, normalize", [("della", 0.5, 0.15, 1.0, None), ("della", 0.4, 0.3, 0.8, False),
                                                                      ("della_linear", 0.6, 0.2, 1.2, None), ("della_linear", 0.3, 0.1, 1.0, True)])  # fmt: skip
def test_della_keeps_by_magnitude_rank_rescales_and_combines_as_its_formula(method, density, epsilon, lam, normalize):
    base, ts = inputs(n=3, shape=(7, 12), seed=11)
    w = [1.0, 0.5, 2.0]
    opts = MergeOptions(method=method, density=density, epsilon=epsilon, lambda_=lam, normalize=normalize, seed=5)
    out = merge_tensor(opts, "layer.weight", base, ts, w)
    expected = della_oracle(base, ts, w, density=density, epsilon=epsilon, lam=lam, normalize=opts.kwargs()["normalize"], elect=method == "della",
                            seed=seed_for(5, "layer.weight"))  # fmt: skip
    close(out, expected)
    assert not np.allclose(out, merge_tensor(MergeOptions(method="task_arithmetic"), "p", base, ts, w))


def test_della_of_a_float64_model_ranks_and_merges_in_float64():
    base, ts = inputs(n=2, shape=(6, 10), seed=16)
    base, ts = base.astype(np.float64), [t.astype(np.float64) + 1e-12 for t in ts]  # differences float32 cannot hold
    out = merge_tensor(MergeOptions(method="della", density=0.5, seed=2), "w", base, ts, [1.0, 1.0])
    assert out.dtype == np.float64
    assert_allclose(out, della_oracle(base, ts, [1.0, 1.0], density=0.5, epsilon=0.15, lam=1.0, normalize=True, elect=True, seed=seed_for(2, "w")), rtol=1e-12, atol=1e-12)


def test_della_keeps_the_density_on_average_more_of_the_large_entries_and_rescales_to_the_l1_norm():
    """The statistics mergekit's della_magprune has: kept fraction = density overall, density ∓
    epsilon at the two ends of each row's ranking, kept entries scaled by ‖τ‖₁ / ‖kept τ‖₁."""
    rng = np.random.default_rng(3)
    base = np.zeros((200, 1000), np.float32)  # out - base is then exactly the pruned and rescaled τ
    theta = rng.standard_normal(base.shape, np.float32)
    density, epsilon = 0.4, 0.2
    out = merge_tensor(MergeOptions(method="della_linear", density=density, epsilon=epsilon, seed=1), "w", base, [theta], [1.0])
    tau, got = (theta - base).astype(np.float64), (out - base).astype(np.float64)
    kept = got != 0
    assert abs(kept.mean() - density) < 0.005
    ranks = np.argsort(np.argsort(np.abs(tau), axis=1, kind="stable"), axis=1)
    assert abs(kept[ranks < 100].mean() - (density - epsilon * 0.9)) < 0.01  # bottom tenth of each row: p from 0.2 to 0.236
    assert abs(kept[ranks >= 900].mean() - (density + epsilon * 0.9)) < 0.01  # top tenth: p from 0.564 to 0.6
    scale = got[kept] / tau[kept]
    assert_allclose(scale, np.abs(tau).sum() / np.abs(tau[kept]).sum(), rtol=1e-5)
    assert_allclose(np.abs(got).sum(), np.abs(tau).sum(), rtol=1e-5)  # the L1 norm is kept


def test_della_is_reproducible_by_seed_and_draws_anew_for_another_seed_parameter_or_input():
    base, ts = inputs(n=2, shape=(40, 50), seed=12)
    opts = MergeOptions(method="della_linear", density=0.5, seed=7)
    a = merge_tensor(opts, "x", base, ts, [1.0, 1.0])
    assert np.array_equal(a, merge_tensor(opts, "x", base, ts, [1.0, 1.0]))
    assert not np.array_equal(a, merge_tensor(MergeOptions(method="della_linear", density=0.5, seed=8), "x", base, ts, [1.0, 1.0]))
    assert not np.array_equal(a, merge_tensor(opts, "y", base, ts, [1.0, 1.0]))
    first, second = (merge_tensor(opts, "x", base, [t, t], [1.0, 0.0]) != base for t in ts[:1] * 2)
    same_input_twice = merge_tensor(opts, "x", base, [ts[0], ts[0]], [0.0, 1.0]) != base
    assert np.array_equal(first, second) and not np.array_equal(first, same_input_twice)  # input 2 draws its own mask


def test_della_at_density_1_prunes_nothing_and_equals_ties_and_task_arithmetic():
    base, ts = inputs(n=3, shape=(9, 8), seed=13)
    w = [1.0, 2.0, 0.5]
    close(merge_tensor(MergeOptions(method="della"), "p", base, ts, w), merge_tensor(MergeOptions(method="ties"), "p", base, ts, w))
    close(merge_tensor(MergeOptions(method="della_linear", lambda_=0.7), "p", base, ts, w),
          merge_tensor(MergeOptions(method="task_arithmetic", lambda_=0.7), "p", base, ts, w))  # fmt: skip


def test_della_ranks_along_axis_1_of_a_3d_tensor_and_a_1d_tensor_is_one_row():
    base, ts = inputs(n=1, shape=(3, 40, 2), seed=14, scale=1.0)
    out = merge_tensor(MergeOptions(method="della_linear", density=0.5, epsilon=0.45), "p", base, ts, [1.0])
    kept = (out != base)
    tau = ts[0] - base
    ranks = np.argsort(np.argsort(np.abs(tau), axis=1, kind="stable"), axis=1)
    assert kept[ranks >= 36].mean() > 0.8 and kept[ranks < 4].mean() < 0.2  # p 0.86-0.95 vs 0.05-0.14 within each axis-1 fibre
    base1, ts1 = inputs(n=1, shape=(500,), seed=15)
    out1 = merge_tensor(MergeOptions(method="della_linear", density=0.5, epsilon=0.45), "b", base1, ts1, [1.0])
    order = np.argsort(np.abs(ts1[0] - base1), kind="stable")
    assert (out1 != base1)[order[-100:]].mean() > 0.8 and (out1 != base1)[order[:100]].mean() < 0.2


@pytest.mark.parametrize("density, epsilon, allowed", [(0.9, 0.15, "0.1"), (0.1, 0.2, "0.1"), (0.5, 0.5, "0.5")])
def test_della_refuses_a_density_and_epsilon_that_leave_the_unit_interval(density, epsilon, allowed):
    message = f"della needs density ± epsilon within \\(0, 1\\), as mergekit's; got density {density} and epsilon {epsilon}: give an epsilon below {allowed}"
    with pytest.raises(ConfigError, match=message):
        MergeOptions.parse("invalid merge option", method="della", density=density, epsilon=epsilon)
    MergeOptions(method="della", density=1.0, epsilon=epsilon)  # nothing is pruned at density 1


# ---- sce ------------------------------------------------------------------------------------------


def sce_oracle(base, ts, select_topk):
    """mergekit's SCE written out: population variance of τ over the inputs, the top int(nnz ·
    select_topk) (float32 count) entries kept (ties to the lower index), weights mean(τ²) / their sum
    (1/N below 1e-6), sign election on Σ τ, Σ w e τ / max(Σ w e, 1e-6)."""
    taus = np.stack([(t - base).astype(np.float32) for t in ts]).reshape(len(ts), -1).astype(np.float64)
    n = taus.shape[1]
    if select_topk < 1:
        var = taus.var(axis=0).astype(np.float32)
        k = int(np.float32(np.count_nonzero(var)) * np.float32(select_topk))
        order = sorted(range(n), key=lambda e: (-var[e], e))
        mask = np.zeros(n)
        mask[order[:k]] = 1
        taus = taus * mask
    weights = (taus**2).mean(axis=1)
    weights = np.full(len(ts), 1 / len(ts)) if abs(weights.sum()) < 1e-6 else weights / weights.sum()
    out = np.empty(n)
    for e in range(n):
        positive = taus[:, e].sum() >= 0
        agree = (taus[:, e] > 0) if positive else (taus[:, e] < 0)
        out[e] = base.reshape(-1)[e] + (weights * agree * taus[:, e]).sum() / max((weights * agree).sum(), 1e-6)
    return out.reshape(base.shape)


@pytest.mark.parametrize("n, select_topk, shape", [(3, 1.0, (8, 9)), (4, 0.3, (8, 9)), (2, 0.55, (50,)), (3, 0.1, (2, 5, 7))])
def test_sce_selects_by_variance_weights_by_mean_square_and_elects_signs_as_its_formula(n, select_topk, shape):
    base, ts = inputs(n=n, shape=shape, seed=21)
    ts = [t * np.float32(1 + i) - base * np.float32(i) for i, t in enumerate(ts)]  # unequal scales: unequal weights
    out = merge_tensor(MergeOptions(method="sce", select_topk=select_topk), "p", base, ts, [1.0] * n)
    close(out, sce_oracle(base, ts, select_topk))
    if select_topk < 1:
        assert (out == base).mean() >= 1 - select_topk - 1e-9  # the unselected entries are the base's


def test_sce_weights_equally_where_the_mean_squares_sum_below_1e_6_and_a_lone_input_selects_nothing():
    base, ts = inputs(n=3, shape=(10, 10), seed=22, scale=2e-4)  # mean τ² ≈ 4e-8 each
    ts[2] = base + (ts[2] - base) * np.float32(3)
    out = merge_tensor(MergeOptions(method="sce"), "p", base, ts, [1.0] * 3)
    close(out, sce_oracle(base, ts, 1.0), atol=1e-9)
    taus = np.stack([t - base for t in ts]).astype(np.float64)
    positive = taus.sum(0) >= 0
    agree = np.where(positive, taus > 0, taus < 0)
    close(out, base + (taus * agree).sum(0) / agree.sum(0), atol=1e-9)  # 1/N each: the plain mean of the agreeing
    one = merge_tensor(MergeOptions(method="sce", select_topk=0.5), "p", base, ts[:1], [1.0])
    assert np.array_equal(one, base)  # one input: no variance anywhere, nothing selected (as mergekit)


def test_sce_reads_no_weights():
    base, ts = inputs(n=2)
    with pytest.raises(ConfigError, match=r"sce reads no weights \(as mergekit's\); got \[1.0, 2.0\]: drop them"):
        merge_tensor(MergeOptions(method="sce"), "p", base, ts, [1.0, 2.0])


# ---- karcher --------------------------------------------------------------------------------------


def karcher_oracle(ts, max_iter=10, tol=1e-5):
    """mergekit's iteration on the flattened tensors themselves, in float64."""
    xs = [t.astype(np.float64).reshape(-1) for t in ts]
    if len(xs) == 1:
        return ts[0]
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / n if n > 0 else x * 0 for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return np.zeros_like(ts[0])
    a = 1 / len(valid)
    u = sum(a * units[i] for i in valid)
    u = units[valid[0]] if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        step = np.zeros_like(u)
        for i in valid:
            dot = np.clip(u @ units[i], -1, 1)
            theta = np.arccos(dot)
            if theta >= tol:
                step += a * theta / np.sin(theta) * (units[i] - dot * u)
        size = np.linalg.norm(step)
        if size < tol:
            break
        u = np.cos(size) * u + np.sin(size) * step / size
        if np.linalg.norm(u) > tol:
            u = u / np.linalg.norm(u)
    return (sum(norms) / len(xs) * u).reshape(ts[0].shape)


@pytest.mark.parametrize("scale, n, max_iter", [(0.1, 3, 10), (3.0, 4, 10), (3.0, 3, 0), (3.0, 3, 2), (1e-3, 2, 10)])
def test_karcher_is_the_riemannian_mean_of_the_unit_inputs_times_their_mean_norm(scale, n, max_iter):
    base, ts = inputs(n=n, shape=(12, 7), seed=31, scale=scale)
    ts = [t * np.float32(1 + 0.5 * i) for i, t in enumerate(ts)]  # different norms
    out = merge_tensor(MergeOptions(method="karcher", max_iter=max_iter), "p", base, ts, [1.0] * n)
    close(out, karcher_oracle(ts, max_iter=max_iter))
    if scale == 3.0 and max_iter == 10:  # far apart: not the arithmetic mean, and on the sphere of the mean norm
        assert not np.allclose(out, sum(ts) / n, atol=1e-3)
        assert_allclose(np.linalg.norm(out), np.mean([np.linalg.norm(t) for t in ts]), rtol=1e-5)


def test_karcher_leaves_out_zero_inputs_but_counts_their_norm_and_of_equal_inputs_is_that_input():
    base, ts = inputs(n=2, shape=(5, 6), seed=32, scale=1.0)
    zero = np.zeros_like(base)
    out = merge_tensor(MergeOptions(method="karcher"), "p", base, [ts[0], zero, ts[1]], [1.0] * 3)
    close(out, karcher_oracle([ts[0], zero, ts[1]]))
    close(out, karcher_oracle(ts) * np.float32(2 / 3))  # the same direction, scaled by (‖θ₁‖ + 0 + ‖θ₂‖) / 3
    close(merge_tensor(MergeOptions(method="karcher"), "p", base, [ts[0]] * 3, [1.0] * 3), ts[0])
    assert np.array_equal(merge_tensor(MergeOptions(method="karcher"), "p", base, [zero, zero], [1.0] * 2), zero)
    with pytest.raises(ConfigError, match="karcher reads no weights"):
        merge_tensor(MergeOptions(method="karcher"), "p", base, ts, [1.0, 2.0])


# ---- nuslerp --------------------------------------------------------------------------------------


def nuslerp_oracle(t, v0, v1, axis):
    """Spherical interpolation of v0 and v1 along `axis` (None: flattened), each normalised by
    max(norm, 1e-7), linear where 1 - cos² <= 1e-16."""
    a, b = v0.astype(np.float64), v1.astype(np.float64)
    if axis is None:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    elif axis == 0:
        a, b = a.T, b.T
    out = np.empty_like(a)
    for r in range(a.shape[0]):
        x, y = a[r], b[r]
        cos = np.clip(x @ y / (max(np.linalg.norm(x), 1e-7) * max(np.linalg.norm(y), 1e-7)), -1, 1)
        if 1 - cos**2 <= 1e-16:
            out[r] = (1 - t) * x + t * y
        else:
            theta = np.arccos(cos)
            out[r] = (np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)
    if axis == 0:
        out = out.T
    return out.reshape(v0.shape)


@pytest.mark.parametrize("weights, t", [([1.0, 1.0], 0.5), ([3.0, 1.0], 0.25), ([1.0, -1.0], 0.5), ([0.0, 2.0], 1.0)])
@pytest.mark.parametrize("flatten, row_wise, axis", [(True, False, None), (False, False, -1), (False, True, 0)])
def test_nuslerp_interpolates_the_two_task_vectors_on_the_sphere_at_the_second_inputs_share_of_the_weight(weights, t, flatten, row_wise, axis):
    base, ts = inputs(n=2, shape=(6, 9), seed=41)
    out = merge_tensor(MergeOptions(method="nuslerp", nuslerp_flatten=flatten, nuslerp_row_wise=row_wise), "p", base, ts, weights)
    close(out, base + nuslerp_oracle(t, ts[0] - base, ts[1] - base, axis))
    if 0 < t < 1:
        assert not np.allclose(out, base + (1 - t) * (ts[0] - base) + t * (ts[1] - base), atol=1e-4)


def test_nuslerp_of_colinear_task_vectors_is_linear_and_a_zero_one_is_scaled_by_sin_t_pi_over_2():
    base, ts = inputs(n=1, shape=(4, 5), seed=42)
    tau = ts[0] - base
    close(merge_tensor(MergeOptions(method="nuslerp"), "p", base, [base + tau, base + 2 * tau], [3.0, 1.0]), base + 1.25 * tau)
    out = merge_tensor(MergeOptions(method="nuslerp"), "p", base, [base, ts[0]], [3.0, 1.0])  # τ₁ = 0: cos 0, θ = π/2
    close(out, base + np.sin(0.25 * np.pi / 2) * tau)
    with pytest.raises(ConfigError, match=r"nuslerp interpolates exactly 2 inputs besides the base \(as mergekit's\), got 3"):
        merge_tensor(MergeOptions(method="nuslerp"), "p", base, ts * 3, [1.0] * 3)


def test_nuslerp_row_wise_on_a_1d_tensor_interpolates_the_whole_vector():
    base, ts = inputs(n=2, shape=(30,), seed=43)
    for row_wise in (False, True):
        out = merge_tensor(MergeOptions(method="nuslerp", nuslerp_flatten=False, nuslerp_row_wise=row_wise), "b", base, ts, [1.0, 2.0])
        close(out, base + nuslerp_oracle(2 / 3, ts[0] - base, ts[1] - base, None))


# ---- options, mergekit YAML -----------------------------------------------------------------------


@pytest.mark.parametrize("method, given, message", [
    ("della", {"gamma": 0.1}, "gamma does not apply to della; it reads: density, epsilon, lambda, normalize, seed"),
    ("della_linear", {"t": 0.5}, "t does not apply to della_linear; it reads: density, epsilon, lambda, normalize, seed"),
    ("sce", {"density": 0.5, "normalize": True}, "density, normalize do not apply to sce; it reads: select_topk"),
    ("karcher", {"lambda": 0.5}, "lambda does not apply to karcher; it reads: max_iter, tol"),
    ("nuslerp", {"seed": 1}, "seed does not apply to nuslerp; it reads: nuslerp_flatten, nuslerp_row_wise"),
    ("ties", {"epsilon": 0.1}, "epsilon does not apply to ties; it reads: density, lambda, normalize"),
    ("slerp", {"t": 0.5, "max_iter": 3}, "max_iter does not apply to slerp; it reads: t"),
])  # fmt: skip
def test_a_parameter_the_new_methods_do_not_read_is_refused_by_name(method, given, message):
    with pytest.raises(ConfigError) as err:
        MergeOptions.parse("invalid merge option", method=method, **given)
    assert str(err.value) == f"invalid merge option: {message}"


@pytest.mark.parametrize("given, message", [
    ({"method": "sce", "select_topk": 0}, "select_topk"), ({"method": "sce", "select_topk": 1.5}, "select_topk"),
    ({"method": "karcher", "max_iter": -1}, "max_iter"), ({"method": "karcher", "tol": -1e-3}, "tol"), ({"method": "della", "epsilon": 0}, "epsilon"),
])  # fmt: skip
def test_out_of_range_values_of_the_new_parameters_are_refused_naming_the_option(given, message):
    with pytest.raises(ConfigError, match=f"invalid merge option: {message}"):
        MergeOptions.parse("invalid merge option", **given)


def test_the_new_methods_defaults_are_mergekits():
    kw = MergeOptions(method="della").kwargs()
    assert (kw["density"], kw["epsilon"], kw["lambda_"], kw["normalize"]) == (1.0, 0.15, 1.0, True)
    assert MergeOptions(method="della_linear").kwargs()["normalize"] is False
    kw = MergeOptions(method="karcher").kwargs()
    assert (kw["max_iter"], kw["tol"], kw["select_topk"], kw["row_wise"], kw["flatten"]) == (10, 1e-5, 1.0, False, True)


BASE = {"base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}


def test_mergekit_configs_of_the_new_methods_map_with_their_parameters():
    della = {**BASE, "merge_method": "della", "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}},
                                                         {"model": "b", "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}],
             "parameters": {"lambda": 0.9, "normalize": False}}  # fmt: skip
    plan = plan_from_mergekit(della, "c.yml")
    assert (plan.opts.method, plan.opts.density, plan.opts.epsilon, plan.opts.lambda_, plan.opts.normalize, plan.weights) == ("della", 0.5, 0.1, 0.9, False, [1.0, 0.5])
    plan = plan_from_mergekit({**BASE, "merge_method": "della_linear", "parameters": {"weight": 1.0, "density": 0.4}}, "c.yml")
    assert (plan.opts.method, plan.opts.epsilon, plan.inputs) == ("della_linear", 0.15, ["a", "b"])
    plan = plan_from_mergekit({**BASE, "merge_method": "sce", "parameters": {"select_topk": 0.2}}, "c.yml")
    assert (plan.opts.method, plan.opts.select_topk, plan.base, plan.inputs) == ("sce", 0.2, "base", ["a", "b"])
    plan = plan_from_mergekit({**BASE, "merge_method": "nuslerp", "models": [{"model": "a", "parameters": {"weight": 2}}, {"model": "b", "parameters": {"weight": 1}}],
                               "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}, "c.yml")  # fmt: skip
    assert (plan.opts.nuslerp_flatten, plan.opts.nuslerp_row_wise, plan.weights) == (False, True, [2.0, 1.0])


def test_a_mergekit_karcher_averages_the_base_model_too_where_mergekit_lists_it():
    plan = plan_from_mergekit({**BASE, "merge_method": "karcher", "parameters": {"max_iter": 5, "tol": 1e-6}}, "c.yml")
    assert (plan.base, plan.inputs, plan.opts.max_iter, plan.opts.tol) == ("base", ["a", "b", "base"], 5, 1e-6)  # added last, as mergekit's planner
    listed = plan_from_mergekit({**BASE, "merge_method": "karcher", "models": [{"model": "a"}, {"model": "base"}, {"model": "b"}]}, "c.yml")
    assert listed.inputs == ["a", "base", "b"]
    alone = plan_from_mergekit({"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}]}, "c.yml")
    assert (alone.base, alone.inputs) == ("a", ["a", "b"])  # no base_model: the first model gives the layout only


@pytest.mark.parametrize("config, message", [
    ({**BASE, "merge_method": "della", "models": [{"model": "a", "parameters": {"epsilon": 0.1}}, {"model": "b", "parameters": {"epsilon": 0.2}}]}, "different epsilons"),
    ({**BASE, "merge_method": "della", "parameters": {"density": 0.9, "epsilon": 0.2}}, "della needs density ± epsilon within"),
    ({**BASE, "merge_method": "sce", "parameters": {"weight": 1.0}}, "weight does not apply to sce, which reads no weights"),
    ({**BASE, "merge_method": "karcher", "models": [{"model": "a", "parameters": {"weight": 2.0}}]}, "weight does not apply to karcher"),
    ({"merge_method": "nuslerp", "models": [{"model": "a"}, {"model": "b"}]}, "base_model: Cairn's nuslerp interpolates the two models' task vectors from a base_model"),
    ({**BASE, "merge_method": "ties", "parameters": {"select_topk": 0.5}}, "select_topk does not apply to ties"),
    ({**BASE, "merge_method": "karcher", "parameters": {"epsilon": 0.1}}, "epsilon does not apply to karcher"),
])  # fmt: skip
def test_mergekit_configs_the_new_methods_cannot_take_are_refused_by_name(config, message):
    with pytest.raises(ConfigError, match=message):
        plan_from_mergekit(config, "c.yml")


# ---- adapters, streaming, the CLI -----------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"method": "della", "density": 0.5, "seed": 3}, {"method": "della_linear", "density": 0.6, "epsilon": 0.3},
                                   {"method": "sce", "select_topk": 0.5}, {"method": "karcher"}, {"method": "nuslerp", "nuslerp_flatten": False}])  # fmt: skip
def test_the_new_methods_merge_lora_deltas_exactly_as_the_full_models_they_stand_for(folders, tmp_path, extra):
    base_dir, adapters, fulls = folders
    opts = MergeOptions(**extra)
    merge_models(base_dir, adapters, tmp_path / "from-adapters", opts, progress=False, made_from=MADE_FROM)
    merge_models(base_dir, fulls, tmp_path / "from-full", opts, progress=False, made_from=MADE_FROM)
    a, f, base = state(tmp_path / "from-adapters"), state(tmp_path / "from-full"), state(base_dir)
    assert a.keys() == f.keys()
    for k in a:
        assert_allclose(a[k], f[k], atol=2e-6, rtol=1e-5)
    assert not np.allclose(a["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    if extra["method"] != "karcher":  # the Karcher mean of the fine-tunes themselves moves the untouched tensors by rounding only
        assert np.array_equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_cli_merge_passes_the_new_methods_options_and_refuses_them_where_they_do_not_apply(folders, tmp_path, capsys):
    from cairn.manifest import read_manifest

    base_dir, _, fulls = folders
    common = ["--base", str(base_dir), "--inputs", *map(str, fulls), "--out"]
    runs = {
        "della": (["--density", "0.5", "--epsilon", "0.1", "--seed", "4"], {"density": 0.5, "epsilon": 0.1, "seed": 4}),
        "sce": (["--select-topk", "0.3"], {"select_topk": 0.3}),
        "karcher": (["--max-iter", "3", "--tol", "1e-7"], {"max_iter": 3, "tol": 1e-7}),
        "nuslerp": (["--no-nuslerp-flatten", "--nuslerp-row-wise", "--weights", "1", "3"], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    }
    for method, (flags, expected) in runs.items():
        out = tmp_path / method
        assert main(["merge", "--method", method, *flags, *common, str(out)]) == 0
        options = read_manifest(out)["merge"]["options"]
        assert {k: options[k] for k in expected} == expected
        direct = tmp_path / f"{method}-direct"
        weights = [1.0, 3.0] if method == "nuslerp" else None
        merge_models(base_dir, fulls, direct, MergeOptions(method=method, **expected), weights=weights, progress=False, made_from=MADE_FROM)
        got, want = state(out), state(direct)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert main(["merge", "--method", "ties", "--epsilon", "0.1", *common, str(tmp_path / "x")]) == 4
    assert "epsilon does not apply to ties" in capsys.readouterr().err
    assert main(["merge", "--method", "della", "--density", "0.95", *common, str(tmp_path / "y")]) == 4
    assert "della needs density ± epsilon within (0, 1)" in capsys.readouterr().err


def test_cli_merge_runs_a_mergekit_karcher_config_with_the_base_model_among_its_points(folders, tmp_path):
    import yaml

    base_dir, _, fulls = folders
    config = {"merge_method": "karcher", "base_model": str(base_dir), "models": [{"model": str(f)} for f in fulls], "dtype": "float32"}
    (tmp_path / "k.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", "--config", str(tmp_path / "k.yml"), "--out", str(tmp_path / "k")]) == 0
    got, base, a, b = state(tmp_path / "k"), state(base_dir), state(fulls[0]), state(fulls[1])
    name = "model.layers.0.self_attn.q_proj.weight"
    assert_allclose(got[name], karcher_oracle([a[name], b[name], base[name]]), rtol=1e-5, atol=1e-6)


def test_the_merge_strategy_runs_the_new_methods_over_a_two_task_stream_and_a_pair_method_starts_from_the_one_contribution(tmp_path, monkeypatch):
    import json

    import cairn.strategies.merge as strategy
    from cairn.config import parse_config
    from cairn.experiment import run_experiment
    from conftest import code_tasks

    seen = []
    real = strategy.merge_models
    monkeypatch.setattr(strategy, "merge_models", lambda base, inputs, out, opts, **kw: seen.append((opts.method, len(inputs))) or real(base, inputs, out, opts, **kw))
    cfg = parse_config({
        "name": "m", "base": "tiny-random", "tasks": code_tasks(tmp_path), "probe": None, "setting": "semi",
        "train": {"method": "lora", "epochs": 1, "batch_size": 4, "lr": 1e-2},
        "strategies": [{"name": "della", "kind": "merge", "method": "della", "density": 0.5, "epsilon": 0.1, "seed": 2},
                       {"name": "sce", "kind": "merge", "method": "sce", "select_topk": 0.5},
                       {"name": "karcher", "kind": "merge", "method": "karcher", "max_iter": 5},
                       {"name": "nuslerp", "kind": "merge", "method": "nuslerp"}],
    })  # fmt: skip
    run_experiment(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert sorted(seen) == sorted([("della", 1), ("della", 2), ("sce", 1), ("sce", 2), ("karcher", 1), ("karcher", 2), ("average", 1), ("nuslerp", 2)])
    first, second = (json.loads((tmp_path / "run" / "seeds" / "0" / "nuslerp" / f"stage-{s}.json").read_text()) for s in (1, 2))
    assert first["merged_as"] == "average: one contribution" and "merged_as" not in second
