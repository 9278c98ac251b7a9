"""Sweeps: an experiment re-run over a grid of strategy settings x seeds x task orders, with the
mean and 95% confidence interval of every metric per grid point, and plots against each swept value.

A sweep is one experiment per task order, whose strategies are the config's unswept ones plus one
variant per grid point of each swept strategy (e.g. `olora.lambda1-0.1`); the experiment's seeds
are the sweep's. Every order's run shares one cache (`OUT/cache`), so work common to grid points,
seeds or orders (the base model's scores, a stage-1 adapter that no swept value touches) is done
once, and an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import re
from pathlib import Path

from cairn.config import ExperimentConfig, SweepSpec, experiments
from cairn.evaluation.scores import SUMMARY_KEYS, mean_ci
from cairn.experiment import run_experiment
from cairn.report import CHANGES, HEADLINE, finished_runs, save_png, write_report
from cairn.io import atomic_write_json, atomic_write_text

SCHEMA = 1


def aggregate(results: list[dict], points: list[tuple[str, str, dict]]) -> list[dict]:
    """Per grid point: mean and 95% CI over seeds x orders of each metric (averaged over stages
    and at the last stage), of the training cost, and each order's seed mean."""
    rows = []
    for variant, strategy, point in points:
        per_order = [finished_runs(r["strategies"][variant]) for r in results]
        runs = [run for order in per_order for run in order]
        rows.append({
            "variant": variant,
            "strategy": strategy,
            "values": point,
            "runs": len(runs),
            "diverged": sum(len(r["strategies"][variant].get("diverged", {})) for r in results),
            **{part: {k: mean_ci([run[part][k] for run in runs]) for k in SUMMARY_KEYS} for part in ("summary", "final")},
            "train_wall_s": mean_ci([run["cost"]["train_wall_s"] for run in runs]),
            "by_order": [{k: mean_ci([run["final"][k] for run in order])["mean"] for k in HEADLINE} for order in per_order],
        })
    return rows


def format_stat(stat: dict, signed: bool = False) -> str:
    """Mean ± CI; a change (old_change, bwt, fwt) with its sign, a score without."""
    if stat["mean"] is None:
        return "–"
    return (f"{stat['mean']:+.3f}" if signed else f"{stat['mean']:.3f}") + (f" ± {stat['ci95']:.3f}" if stat["ci95"] is not None else "")


def markdown(sweep: dict) -> str:
    """The sweep's tables: every metric's mean ± 95% CI per grid point."""
    out = [f"# Sweep: {sweep['name']}", "", f"Seeds {sweep['seeds']}; {len(sweep['orders'])} task order(s):", ""]
    out += [f"- order {k}: {' → '.join(order)}" for k, order in enumerate(sweep["orders"])]
    out.append("")
    n = len(sweep["seeds"]) * len(sweep["orders"])
    for part, title in (("summary", "averaged over stages"), ("final", "at the last stage")):
        out += [f"## Mean ± 95% CI over {n} run(s), {title}", "", "| variant | runs | " + " | ".join(HEADLINE) + " | train s |", "|" + "---|" * (len(HEADLINE) + 3)]
        for row in sweep["rows"]:
            cells = [format_stat(row[part][k], k in CHANGES) for k in HEADLINE]
            out.append(f"| {row['variant']} | {row['runs']} | " + " | ".join(cells) + f" | {row['train_wall_s']['mean'] or 0:.0f} |")
        out.append("")
    if len(sweep["orders"]) > 1:
        out += ["## Each order's seed mean, at the last stage (op / bwt)", "", "| variant | " + " | ".join(f"order {k}" for k in range(len(sweep["orders"]))) + " |",
                "|" + "---|" * (len(sweep["orders"]) + 1)]
        for row in sweep["rows"]:
            cells = [f"{o['op']:.3f} / {o['bwt']:+.3f}" if o["op"] is not None and o["bwt"] is not None else "–" for o in row["by_order"]]
            out.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["CI: Student t over the seeds x orders of each grid point; – where undefined. Metrics as in each run's summary.md.", ""]
    return "\n".join(out)


def plots(sweep: dict, out: Path) -> list[str]:
    """Per swept key: each headline metric (at the last stage) against the key's values, one line per
    combination of the strategy's other swept keys, with 95% CI bars. Without a grid: one bar per
    strategy and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    swept = sorted({(row["strategy"], key) for row in sweep["rows"] for key in row["values"]})
    for strategy, key in swept:
        rows = [row for row in sweep["rows"] if row["strategy"] == strategy]
        values = list(dict.fromkeys(row["values"][key] for row in rows))
        fig, axes = plt.subplots(1, len(HEADLINE), figsize=(3.1 * len(HEADLINE), 3.2), layout="constrained")
        lines: dict[tuple, list] = {}
        for row in rows:
            lines.setdefault(tuple((k, v) for k, v in row["values"].items() if k != key), []).append(row)
        for others, members in lines.items():
            label = ", ".join(f"{k}={v}" for k, v in others) or None
            for ax, metric in zip(axes, HEADLINE):
                stats = [m["final"][metric] for m in members]
                xs = [values.index(m["values"][key]) for m in members]
                ys = [s["mean"] if s["mean"] is not None else float("nan") for s in stats]
                ax.errorbar(xs, ys, yerr=[s["ci95"] or 0.0 for s in stats], marker="o", capsize=3, label=label)
        for ax, metric in zip(axes, HEADLINE):
            ax.set_title(metric)
            ax.set_xticks(range(len(values)), [str(v) for v in values])
            ax.set_xlabel(key)
            ax.grid(alpha=0.3)
        if len(lines) > 1:
            axes[0].legend(fontsize=7)
        fig.suptitle(f"{strategy}: metrics at the last stage against {key} (mean, 95% CI over {len(sweep['seeds']) * len(sweep['orders'])} runs)")
        files.append(save_png(fig, out / f"sweep_{re.sub(r'[^A-Za-z0-9_.-]', '_', strategy)}_{key.replace('.', '_')}.png"))
    if not swept:
        rows = sweep["rows"]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(HEADLINE)), 3.8))
        width = 0.8 / max(len(rows), 1)
        for i, row in enumerate(rows):
            stats = [row["final"][k] for k in HEADLINE]
            ax.bar([j + i * width for j in range(len(HEADLINE))], [s["mean"] or 0.0 for s in stats], width, yerr=[s["ci95"] or 0.0 for s in stats],
                   capsize=3, label=row["variant"])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(HEADLINE))], HEADLINE)
        ax.set_title(f"at the last stage: mean, 95% CI over {len(sweep['seeds']) * len(sweep['orders'])} runs (seeds x orders)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
        files.append(save_png(fig, out / "sweep_strategies.png"))
    return files


def run_sweep(cfg: ExperimentConfig, sweep: SweepSpec | None = None, out: Path | None = None, *, progress: bool = True, log=print) -> dict | None:
    """Run every order's experiment (writing its report under `OUT/order-K/`), then aggregate into
    `OUT/sweep.json`, `OUT/sweep.md` and plots. Returns the sweep dict (None in processes other than
    the main one under `accelerate launch`)."""
    sweep = sweep or cfg.sweep or SweepSpec()
    out = Path(out or cfg.out_dir())
    configs, points = experiments(cfg, sweep)
    results = []
    for k, order_cfg in enumerate(configs):
        log(f"order {k}: {' -> '.join(t.name or t.source for t in order_cfg.tasks)}")
        result = run_experiment(order_cfg, out / f"order-{k}", cache=out / "cache", progress=progress, log=log)
        if result is not None:
            write_report(result, out / f"order-{k}")
            results.append(result)
    if not results:
        return None
    summary = {
        "schema": SCHEMA,
        "name": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "sweep": sweep.model_dump(mode="json"),
        "seeds": configs[0].seeds,
        "orders": [r["tasks"] for r in results],
        "rows": aggregate(results, points),
    }
    atomic_write_json(out / "sweep.json", summary)
    atomic_write_text(out / "sweep.md", markdown(summary))
    summary["plots"] = plots(summary, out)
    return summary
