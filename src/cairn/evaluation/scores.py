"""The score matrix R[s][j], probe scores G[s], and the knowledge metrics of DESIGN.md.

Stages are s = 0..n (0 is the base model); tasks j = 1..n are stored in columns 0..n-1.
"""

from __future__ import annotations

import math
from statistics import mean, stdev

SUMMARY_KEYS = ("new", "recent", "retained", "old", "old_change", "op", "bwt", "fwt")


def per_stage(R: list[list[float]], G: list[float]) -> dict[str, list[float | None]]:
    """Each metric at stages 1..n (None where undefined: recent, retained, bwt and fwt at stage 1;
    fwt there would be R[0][1] - R[0][1], 0 whatever the strategy does, and would pull its
    average towards 0)."""
    n = len(R) - 1
    r = lambda s, j: R[s][j - 1]  # noqa: E731  (1-based task index, as in the definitions)
    out: dict[str, list[float | None]] = {k: [] for k in SUMMARY_KEYS}
    for s in range(1, n + 1):
        earlier = range(1, s)
        out["new"].append(r(s, s))
        out["recent"].append(r(s, s - 1) if s >= 2 else None)
        out["retained"].append(mean(r(s, j) for j in earlier) if s >= 2 else None)
        out["old"].append(G[s] if G else None)
        out["old_change"].append(G[s] - G[0] if G else None)
        out["op"].append(mean(r(s, j) for j in range(1, s + 1)))
        out["bwt"].append(mean(r(s, j) - r(j, j) for j in earlier) if s >= 2 else None)
        out["fwt"].append(r(s - 1, s) - r(0, s) if s >= 2 else None)
    return out


def summarize(R: list[list[float]], G: list[float]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(average over the stages where each metric is defined, value at the last stage)."""
    stages = per_stage(R, G)
    avg = {k: (mean(v) if (v := [x for x in xs if x is not None]) else None) for k, xs in stages.items()}
    final = {k: xs[-1] for k, xs in stages.items()}
    return avg, final


# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (beyond: the normal 1.96);
# thirty constants rather than a SciPy dependency for one function.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_ci(values: list[float | None]) -> dict[str, float | None]:
    """Mean and 95% confidence half-width (Student t) over seeds; half-width None for one seed."""
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    if len(xs) == 1:
        return {"mean": xs[0], "ci95": None, "n": 1}
    t = _T975[len(xs) - 2] if len(xs) - 1 <= len(_T975) else 1.96
    return {"mean": mean(xs), "ci95": t * stdev(xs) / math.sqrt(len(xs)), "n": len(xs)}


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p of Welch's t-test that two samples of seeds share a mean; None with fewer than
    two values on either side (no variance to test), 1.0 where both are constant and equal."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import ttest_ind

    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return 1.0 if math.isnan(p) else p
