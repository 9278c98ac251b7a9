"""Equal-budget tuning and the learning–forgetting frontier.

Every strategy tries the same number of grid points (`TuneSpec.points()`) at the same tuning
seeds; each point's stages are scored on the eval splits (each task's eval split, the probe's
eval half) and, for the frontier only, on the test splits. A strategy's setting is chosen on the
eval scores alone: the best `metric` among the points whose eval old_change is no worse than
`-max_forgetting`. The verdict then re-runs each strategy at its chosen setting for every seed of
the experiment, scored on the test splits, with its tuning cost beside its scores.

In the semi setting a contribution's training settings are its contributor's choice, made from
the data it holds: for each task, the contribution trained from the base on that task alone is
scored on the task's eval split and the probe's eval half, and the best qualifying setting
becomes the strategy's `task_train` entry for the task. A strategy's own options (λ, density, a
router's temperature) are then chosen on the stage models' eval scores, which each contributor
can compute on its own eval split and report as a number: no data moves.

All points share one cache (`OUT/cache`), so a contribution common to points, strategies or the
verdict (the merge and moe strategies' contributions, the stage-1 model of every sequential
variant) is trained once, and an interrupted tuning resumes where it stopped.
"""

from __future__ import annotations

import math
from pathlib import Path

from cairn.config import ExperimentConfig, TuneSpec, parse_config, tuning_grid, variant_name
from cairn.evaluation.scores import mean_ci, welch_p
from cairn.experiment import run_experiment
from cairn.io import atomic_write_json, atomic_write_text
from cairn.report import ALPHA, CHANGES, finished_runs, save_png, write_report
from cairn.sweep import format_stat

SCHEMA = 1
MATCHED_AT = (0.25, 0.5, 0.75)  # the frontier's matched comparison: at learning >= x, who keeps the most


def _stat(runs: list[dict], part: str, key: str, eval_split: bool) -> dict:
    values = [(r["eval"] if eval_split else r)[part][key] for r in runs]
    return mean_ci(values)


def point_rows(result: dict, points: list[tuple[str, str, dict]], metric: str) -> list[dict]:
    """Per grid point: the last stage's `metric` and old_change on the eval splits (mean over the
    tuning seeds) and on the test splits (mean and 95% CI), and what its training cost."""
    rows = []
    for variant, strategy, point in points:
        entry = result["strategies"][variant]
        runs = finished_runs(entry)
        rows.append({
            "variant": variant,
            "strategy": strategy,
            "values": point,
            "runs": len(runs),
            "eval": {k: _stat(runs, "final", k, True)["mean"] if runs else None for k in (metric, "new", "old_change")},
            "test": {k: _stat(runs, "final", k, False) if runs else mean_ci([]) for k in (metric, "new", "old_change")},
            "test_old_change": [r["final"]["old_change"] for r in runs if r["final"]["old_change"] is not None],  # per seed, for Welch's p
            "train_wall_s": round(sum(r["cost"]["train_wall_s"] for r in (entry["seeds"].values() if "seeds" in entry else [entry])), 1),
        })
    return rows


def _qualifies(row: dict, tune: TuneSpec) -> bool:
    change = row["eval"]["old_change"]
    return tune.max_forgetting is None or change is None or change >= -tune.max_forgetting


def choose(rows: list[dict], tune: TuneSpec, key: str | None = None) -> dict[str, dict]:
    """Per strategy, its chosen row: the best eval `key` (default the tuning metric) among the rows
    that meet the forgetting bound; ties go to the smaller loss of old knowledge. Where no row meets
    the bound, the one that forgets least, marked `bound_met: False`."""
    key = key or tune.metric
    chosen = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy and r["eval"][key] is not None]
        if not mine:
            continue
        ok = [r for r in mine if _qualifies(r, tune)]
        old = lambda r: r["eval"]["old_change"] if r["eval"]["old_change"] is not None else -math.inf  # noqa: E731
        best = max(ok, key=lambda r: (r["eval"][key], old(r))) if ok else max(mine, key=old)
        chosen[strategy] = {**best, "bound_met": bool(ok)}
    return chosen


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both higher is better), by x."""
    front = [i for i, (x, y) in enumerate(points) if not any((x2 >= x and y2 >= y) and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def frontier(rows: list[dict], metric: str, at: tuple[float, ...] = MATCHED_AT) -> dict:
    """Per strategy: its points' (test `metric`, test old_change) with CIs and its Pareto front;
    and the matched comparison: at eval `metric` >= x, each strategy's point that keeps the most
    old knowledge on the eval splits, reported by its test scores (chosen on eval, never on test)."""
    by_strategy = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy and r["test"][metric]["mean"] is not None]
        xy = [(r["test"][metric]["mean"], r["test"]["old_change"]["mean"] if r["test"]["old_change"]["mean"] is not None else 0.0) for r in mine]
        by_strategy[strategy] = {"points": [r["variant"] for r in mine], "front": [mine[i]["variant"] for i in pareto(xy)]}
    matched = []
    for x in at:
        entry, seeds = {"at": x, "strategies": {}}, {}
        for strategy in by_strategy:
            able = [r for r in rows if r["strategy"] == strategy and r["eval"][metric] is not None and r["eval"][metric] >= x]
            if able:
                best = max(able, key=lambda r: r["eval"]["old_change"] if r["eval"]["old_change"] is not None else -math.inf)
                entry["strategies"][strategy] = {"variant": best["variant"], metric: best["test"][metric], "old_change": best["test"]["old_change"]}
                seeds[strategy] = best.get("test_old_change", [])
        kept = {s: v["old_change"]["mean"] for s, v in entry["strategies"].items() if v["old_change"]["mean"] is not None}
        entry["keeps_most"] = winner = max(kept, key=kept.get) if kept else None
        # Welch's p of each other strategy's test old_change against the one that keeps the most
        entry["p"] = {s: welch_p(seeds[winner], seeds[s]) for s in kept if s != winner} if winner else {}
        matched.append(entry)
    return {"metric": metric, "strategies": by_strategy, "matched": matched}


def markdown(summary: dict) -> str:
    """tune.md: every grid point's eval and test scores, the choice per strategy, the frontier."""
    metric, tune = summary["metric"], summary["tune"]
    bound = f"eval old_change ≥ −{tune['max_forgetting']}" if tune["max_forgetting"] is not None else "no forgetting bound"
    out = [
        f"# Tuning: {summary['name']}",
        "",
        f"Every strategy tried {summary['budget']} grid point(s) × {len(summary['seeds'])} seed(s) {summary['seeds']} (setting {summary['setting']}). "
        f"Chosen on the eval splits only: the best eval {metric} with {bound}. Test scores are shown for the frontier; they never enter a choice.",
        "",
        f"| point | runs | eval {metric} | eval old_change | test {metric} | test old_change | train s | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    chosen = {c["variant"] for c in summary["chosen"].values()}
    for r in summary["rows"]:
        e = r["eval"]
        cells = ["–" if e[metric] is None else f"{e[metric]:.3f}", "–" if e["old_change"] is None else f"{e['old_change']:+.3f}",
                 format_stat(r["test"][metric], metric in CHANGES), format_stat(r["test"]["old_change"], True)]
        out.append(f"| {r['variant']} | {r['runs']} | " + " | ".join(cells) + f" | {r['train_wall_s']:.0f} | {'✓' if r['variant'] in chosen else ''} |")
    out.append("")
    if summary.get("task_train"):
        out += ["## Per-contribution choices (semi setting)", "", "Each contributor chose its training settings on its own task's eval split and the probe's eval half:", ""]
        for strategy, per_task in summary["task_train"].items():
            out.append(f"- {strategy}: " + "; ".join(f"{task}: {', '.join(f'{k}={v}' for k, v in keys.items())}" for task, keys in per_task.items()))
        out.append("")
    unmet = [s for s, c in summary["chosen"].items() if not c["bound_met"]]
    if unmet:
        out += [f"No point of {', '.join(unmet)} met the forgetting bound; the one that forgets least was chosen.", ""]
    front = summary["frontier"]
    out += [f"## The learning–forgetting frontier (test {metric} against test old_change)", ""]
    out += [f"- {s}: Pareto front {' → '.join(v['front'])}" for s, v in front["strategies"].items()]
    out += ["", f"Matched comparison: at eval {metric} ≥ x, each strategy's point that keeps the most old knowledge on the eval splits, by its test scores.", "",
            "| x | " + " | ".join(front["strategies"]) + " | keeps the most |", "|" + "---|" * (len(front["strategies"]) + 2)]
    for m in front["matched"]:
        cells = []
        for s in front["strategies"]:
            v = m["strategies"].get(s)
            cells.append(f"{format_stat(v[metric], False)} / {format_stat(v['old_change'], True)}" if v else "does not reach x")
        out.append(f"| {m['at']} | " + " | ".join(cells) + f" | {_keeps_most(m)} |")
    out += ["", f"Cells: test {metric} / test old_change, mean ± 95% CI over the tuning seeds. p: Welch's t-test of each other strategy's "
            f"test old_change against the one that keeps the most; below {ALPHA} the difference is significant.", ""]
    return "\n".join(out)


def _keeps_most(matched: dict) -> str:
    """The matched comparison's winner with its p against each other strategy ('–' if none reached x)."""
    if not matched["keeps_most"]:
        return "–"
    winner, others = matched["keeps_most"], matched.get("p", {})
    tested = [f"p = {p:.2g} vs {s}" for s, p in others.items() if p is not None]
    return f"{winner} ({'; '.join(tested)})" if tested else f"{winner} (one seed: no test)" if others else winner


def _point_label(values: dict) -> str:
    """A grid point's values, short: {"train.lr": 5e-4, "train.lora_r": 16} -> "lr 5e-4, r 16"."""
    def short(v):
        return f"{v:.0e}".replace("e-0", "e-") if isinstance(v, float) and 0 < abs(v) < 0.01 else f"{v:g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k.rsplit('.', 1)[-1].removeprefix('lora_')} {short(v)}" for k, v in values.items())


def plot(summary: dict, out: Path) -> str:
    """frontier.png: per strategy, its points (test metric, test old_change) with CI bars and its Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    many = len(summary["frontier"]["strategies"]) > 6  # then the legend goes beside the axes, not over the points
    fig, ax = plt.subplots(figsize=(8.4 if many else 6.4, 4.4), layout="constrained")
    rows = {r["variant"]: r for r in summary["rows"]}
    for k, (strategy, v) in enumerate(summary["frontier"]["strategies"].items()):
        colour, marker = f"C{k % 10}", "osD^v"[k // 10 % 5]  # past 10 strategies the colours repeat: the marker tells them apart
        pts = [rows[p] for p in v["points"]]
        ax.errorbar([p["test"][metric]["mean"] for p in pts], [p["test"]["old_change"]["mean"] or 0.0 for p in pts],
                    xerr=[p["test"][metric]["ci95"] or 0.0 for p in pts], yerr=[p["test"]["old_change"]["ci95"] or 0.0 for p in pts],
                    fmt=marker, color=colour, alpha=0.45, capsize=2)
        if not many:  # few points: name each by its grid values, so the plot reads without tune.md
            for p in pts:
                ax.annotate(_point_label(p["values"]), (p["test"][metric]["mean"], p["test"]["old_change"]["mean"] or 0.0),
                            textcoords="offset points", xytext=(5, 4), fontsize=7, color=colour)
        front = [rows[p] for p in v["front"]]
        ax.plot([p["test"][metric]["mean"] for p in front], [p["test"]["old_change"]["mean"] or 0.0 for p in front], "-" + marker, color=colour, label=strategy)
        chosen = summary["chosen"].get(strategy)
        if chosen:
            ax.plot(chosen["test"][metric]["mean"], chosen["test"]["old_change"]["mean"] or 0.0, marker, ms=11, color=colour, mec="black", mew=1.6)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel(f"new knowledge: {metric} at the last stage (test; higher is better)")
    ax.set_ylabel("old_change: G − G[0] (test; 0 is no forgetting)")
    ax.set_title(f"learning vs forgetting, {len(summary['seeds'])} seed(s); line: Pareto front, black edge: chosen on eval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    return save_png(fig, out / "frontier.png")


def _grid_config(cfg: ExperimentConfig, strategies: list[dict], seeds: list[int], name: str) -> ExperimentConfig:
    data = cfg.model_dump(mode="json", exclude={"sweep", "tune"})
    return parse_config({**data, "name": name, "strategies": strategies, "seeds": seeds}, name, like=cfg)


def _train_keys(point: dict) -> dict:
    return {k.split(".", 1)[1]: v for k, v in point.items() if k.startswith("train.")}


def _contributor_choices(cfg: ExperimentConfig, tune: TuneSpec, points, out: Path, cache: Path, seeds: list[int], progress: bool, log) -> tuple[dict, list[dict]]:
    """Semi setting: per strategy and task, the training settings its contributor chooses for the
    task's contribution (trained from the base on that task alone, scored on its eval split and the
    probe's eval half). Returns ({strategy: {task name: train overrides}}, the rows of every try)."""
    choices, tries = {}, []
    strategies = {s.name: s for s in cfg.strategies}
    for k, task in enumerate(cfg.tasks):
        variants, seen = [], set()
        for _variant, strategy, point, _ in points:
            train = _train_keys(point)
            if not train:
                continue
            name = f"{strategy}.train-{len(variants)}"
            key = (strategy, tuple(sorted(train.items())))
            if key in seen:
                continue
            seen.add(key)
            spec = strategies[strategy]
            variants.append(({"name": name, "kind": "sequential", "train": {**spec.train, **train}}, strategy, train))
        if not variants:
            return {}, []
        one = _grid_config(cfg.model_copy(update={"tasks": [task]}), [v for v, *_ in variants], seeds, f"{cfg.name} contributor {k}")
        log(f"contributor {k + 1}/{len(cfg.tasks)}: {len(variants)} training setting(s) on its own task")
        result = run_experiment(one, out / f"contributor-{k}", cache=cache, eval_splits=True, progress=progress, log=log)
        if result is None:
            continue
        task_name = result["tasks"][0]
        rows = point_rows(result, [(v["name"], strategy, train) for v, strategy, train in variants], "new")
        tries += [{**r, "task": task_name} for r in rows]
        for strategy, row in choose(rows, tune, key="new").items():
            choices.setdefault(strategy, {})[task_name] = row["values"]
    return choices, tries


def run_tuning(cfg: ExperimentConfig, out: Path | None = None, *, verdict: bool = True, progress: bool = True, log=print) -> dict | None:
    """Tune every strategy at equal budget, write `OUT/tune.json`, `tune.md` and `frontier.png`,
    then (with `verdict`) run each strategy at its chosen setting for every seed and write the
    report into `OUT`. Returns the tuning summary (None outside the main process)."""
    tune = cfg.tune or TuneSpec()
    out = Path(out or cfg.out_dir())
    seeds = tune.seeds or cfg.seeds[:1]
    points = tuning_grid(cfg, tune)
    log(f"tuning: {len(cfg.strategies)} strategies × {tune.points()} grid point(s) × {len(seeds)} seed(s), chosen on eval splits by {tune.metric}")
    task_train, tries = {}, []
    if cfg.setting == "semi":
        task_train, tries = _contributor_choices(cfg, tune, points, out / "tuning", out / "cache", seeds, progress, log)
    strategies, grid_points = [], []
    for variant, strategy, point, spec in points:
        if strategy in task_train:  # the contributors chose the training settings; the grid left is the options'
            spec = {**spec, "task_train": task_train[strategy], "train": {k: v for k, v in spec["train"].items() if f"train.{k}" not in point}}
            point = {k: v for k, v in point.items() if not k.startswith("train.")}
            spec["name"] = variant_name(strategy, point) if point else strategy
            if any(s["name"] == spec["name"] for s in strategies):  # points that differ only in training settings
                continue
        strategies.append(spec)
        grid_points.append((spec["name"], strategy, point))
    grid_cfg = _grid_config(cfg, strategies, seeds, f"{cfg.name} tuning grid")
    result = run_experiment(grid_cfg, out / "tuning" / "grid", cache=out / "cache", eval_splits=True, progress=progress, log=log)
    if result is None:
        return None
    rows = point_rows(result, grid_points, tune.metric)
    chosen = choose(rows, tune)
    summary = {
        "schema": SCHEMA,
        "name": cfg.name,
        "setting": cfg.setting,
        "tune": tune.model_dump(mode="json"),
        "metric": tune.metric,
        "budget": tune.points(),
        "seeds": seeds,
        "rows": rows,
        "contributor_tries": tries,
        "task_train": task_train,
        "chosen": chosen,
        "frontier": frontier(rows, tune.metric),
    }
    for strategy, row in chosen.items():
        cost = sum(r["train_wall_s"] for r in rows if r["strategy"] == strategy) + sum(r["train_wall_s"] for r in tries if r["strategy"] == strategy)
        row["tuning"] = {"points": tune.points(), "seeds": len(seeds), "train_wall_s": round(cost, 1)}
    atomic_write_json(out / "tune.json", summary)
    atomic_write_text(out / "tune.md", markdown(summary))
    summary["plot"] = plot(summary, out)
    log(f"tuning: {out / 'tune.md'}")
    if verdict:
        picked = {s["name"]: s for s in strategies}
        final = [{**picked[row["variant"]], "name": strategy} for strategy, row in chosen.items()]
        verdict_cfg = _grid_config(cfg, final, list(cfg.seeds), cfg.name)
        results = run_experiment(verdict_cfg, out, cache=out / "cache", progress=progress, log=log)
        if results is not None:
            for strategy, row in chosen.items():
                results["strategies"][strategy]["tuning"] = {**row["tuning"], "chosen": row["values"], "task_train": task_train.get(strategy, {})}
            results["tuning"] = {"metric": tune.metric, "max_forgetting": tune.max_forgetting, "budget": tune.points(), "seeds": seeds}
            write_report(results, out)
            summary["results"] = str(out / "results.json")
    return summary
