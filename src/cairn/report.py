"""Results of an experiment: results.json, R_<strategy>.csv, summary.md, report.html and PNG plots."""

from __future__ import annotations

import csv
import datetime
import html
import io
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cairn.errors import DataError
from cairn.evaluation.scores import SUMMARY_KEYS, mean_ci, per_stage, welch_p
from cairn.io import atomic_write_json, atomic_write_text, read_json_object

SCHEMA = 1
HEADLINE = ("new", "retained", "old_change", "op", "bwt", "fwt")


def _mean_matrix(ms: list[list[list[float]]]) -> list[list[float]]:
    return [[sum(m[i][j] for m in ms) / len(ms) for j in range(len(ms[0][i]))] for i in range(len(ms[0]))]


def _strategy_entry(by_seed: dict[int, dict]) -> dict:
    """One strategy's results over its seeds. Seeds whose training diverged are listed under
    `diverged` and left out of every mean; when all diverged, R and G hold the stages finished by
    all of them and the summaries are None."""
    seeds = list(by_seed.values())
    done = [s for s in seeds if "diverged" not in s]
    scored = done or seeds
    depth = min(len(s["R"]) for s in scored)
    entry = {
        "R": _mean_matrix([s["R"][:depth] for s in scored]),
        "G": [sum(g) / len(g) for g in zip(*[s["G"][:depth] for s in scored])] if seeds[0]["G"] else None,
        "summary": {k: mean_ci([s["summary"][k] for s in done])["mean"] for k in SUMMARY_KEYS},
        "final": {k: mean_ci([s["final"][k] for s in done])["mean"] for k in SUMMARY_KEYS},
        "cost": seeds[0]["cost"] if len(seeds) == 1 else {k: mean_ci([s["cost"][k] for s in seeds])["mean"] for k in seeds[0]["cost"]},
    }
    if "probes" in seeds[0]:  # further probes, each per stage, averaged over seeds like G
        entry["probes"] = {name: [sum(v) / len(v) for v in zip(*[s["probes"][name][:depth] for s in scored])] for name in seeds[0]["probes"]}
    if len(seeds) == 1:  # what several seeds keep per seed: the eval-split scores tuning chooses on, the stages' notes
        entry.update({k: seeds[0][k] for k in ("eval", "stages") if k in seeds[0]})
    if len(seeds) > 1:
        entry["seeds"] = {str(seed): run for seed, run in by_seed.items()}
        entry["aggregate"] = {part: {k: mean_ci([s[part][k] for s in done]) for k in SUMMARY_KEYS} for part in ("summary", "final")}
    diverged = {str(seed): run["diverged"] for seed, run in by_seed.items() if "diverged" in run}
    if diverged:
        entry["diverged"] = diverged
    return entry


def build_results(cfg, task_names: list[str], runs: dict[str, dict[int, dict]]) -> dict:
    """The versioned results dict: per strategy, seed-mean R and G, summaries and costs; with
    several seeds also every seed's values and the mean with a 95% confidence interval."""
    strategies = {name: _strategy_entry(by_seed) for name, by_seed in runs.items()}
    return {"schema": SCHEMA, "config": cfg.model_dump(mode="json"), "tasks": task_names, "seeds": list(cfg.seeds), "strategies": strategies,
            "date": datetime.date.today().isoformat()}


CHANGES = ("old_change", "bwt", "fwt")  # differences, zero is no change: printed with a sign; scores without


def _fmt(x, ci=None, signed: bool = True) -> str:
    if x is None:
        return "–"
    text = f"{x:+.3f}" if signed else f"{x:.3f}"
    return text if ci is None else f"{text} ± {ci:.3f}"


def all_diverged(results: dict, name: str) -> bool:
    """True when every seed of strategy `name` diverged, so it has no summary."""
    return len(results["strategies"][name].get("diverged", {})) == len(results["seeds"])


def divergence_note(results: dict, name: str) -> str:
    """'diverged at stage 2' (one seed), 'seed 1 diverged at stage 2' (several), or ''."""
    diverged = results["strategies"][name].get("diverged", {})
    if len(results["seeds"]) == 1:
        return "".join(f"diverged at stage {d['stage']}" for d in diverged.values())
    return ", ".join(f"seed {seed} diverged at stage {d['stage']}" for seed, d in diverged.items())


def summary_rows(results: dict, part: str = "summary") -> list[list[str]]:
    """One row per strategy: the headline metrics (mean ± CI with seeds), then cost. A strategy
    whose every seed diverged shows where instead of metrics; diverged seeds are named beside the
    strategy and left out of its means."""
    rows = []
    for name, s in results["strategies"].items():
        agg = s.get("aggregate", {}).get(part)
        cells = [_fmt(agg[k]["mean"], agg[k]["ci95"], k in CHANGES) if agg else _fmt(s[part][k], signed=k in CHANGES) for k in HEADLINE]
        label, note = name, divergence_note(results, name)
        if all_diverged(results, name):
            cells = [note] + [""] * (len(HEADLINE) - 1)
        elif note:
            label = f"{name} ({note}; mean of the other seeds)"
        c = s["cost"]
        rows.append([label, *cells, f"{c['train_wall_s']:.0f}", f"{c['tokens']:.0f}", f"{c['trainable_params']:.3g}", f"{c['peak_mem_mb']:.0f}", f"{c['disk_mb']:.0f}"])
    return rows


# The cost columns say what each one adds up: train s and tokens are sums over every training of
# the run (not one stage's), trainable and memory the largest of its trainings (Workspace.cost).
SUMMARY_HEADER = ["strategy", *HEADLINE, "train s (all stages)", "tokens (all stages)", "trainable (max)", "train peak +MB (max)", "disk MB (all)"]


ALPHA = 0.05  # the ranking's significance level (Welch's t-test over seeds)


def finished_runs(entry: dict) -> list[dict]:
    """A strategy's per-seed runs that did not diverge, from its results entry (one seed keeps no `seeds`)."""
    runs = list(entry["seeds"].values()) if "seeds" in entry else [entry]
    return [r for r in runs if "diverged" not in r]


def _seed_values(entry: dict, metric: str) -> list[float]:
    return [r["final"][metric] for r in finished_runs(entry) if r.get("final") and r["final"].get(metric) is not None]


def rank(results: dict, metric: str = "op") -> list[dict]:
    """The strategies by their mean `metric` at the last stage, best first, each with its 95% CI,
    its tuning cost where it was tuned, and (with two seeds or more) Welch's p against the best;
    `tied` marks the group not significantly different from the best at ALPHA."""
    rows = []
    for name, entry in results["strategies"].items():
        values = _seed_values(entry, metric)
        if values:
            rows.append({"strategy": name, "values": values, **mean_ci(values), "train_s": entry["cost"]["train_wall_s"], "tuning": entry.get("tuning")})
    rows.sort(key=lambda r: r["mean"], reverse=True)
    for r in rows:
        best = rows[0]["values"]
        if r is rows[0]:
            r.update(p=None, tied=True)
        elif (p := welch_p(best, r["values"])) is None:
            r.update(p=None, tied=None)  # one seed: no significance can be claimed
        else:
            r.update(p=round(p, 4), tied=p >= ALPHA)
    return rows


def recommendation(ranking: list[dict], metric: str = "op") -> str:
    """One sentence: the best strategy, its CI, and which others it cannot be told from."""
    if not ranking:
        return "No strategy finished, so there is nothing to recommend."
    best, n = ranking[0], len(ranking[0]["values"])
    ci = f" ± {best['ci95']:.3f}" if best["ci95"] is not None else ""
    head = f"With {n} seed{'s' if n > 1 else ''}, {best['strategy']} has the highest {metric} ({best['mean']:.3f}{ci})"
    if len(ranking) == 1:
        return head + "."
    if n < 2:
        return head + "; with one seed no difference can be called significant: run more seeds (`seeds: [0, 1, 2]`) before trusting this ranking."
    tied = [r for r in ranking[1:] if r["tied"]]
    if not tied:
        return head + f", significantly above every other strategy (Welch's t-test, p < {ALPHA}): use it."
    names = ", ".join(f"{r['strategy']} (p = {r['p']:.2f})" for r in tied)
    return head + f"; {names} {'is' if len(tied) == 1 else 'are'} not significantly different at α = {ALPHA}: any of them is a defensible choice, and more seeds would separate them."


Table = tuple[list[str], list[list[str]]]  # a header and its rows, rendered to Markdown or HTML


def ranking_table(ranking: list[dict], metric: str = "op") -> Table:
    """The ranking as a table: rank, strategy, mean ± CI, p against the best, whether it is in the
    best's group, training seconds, and tuning seconds where a strategy was tuned."""
    tuned = any(r["tuning"] for r in ranking)
    header = ["rank", "strategy", f"{metric} (mean ± 95% CI)", "p vs best", "same group as the best", "train s"] + (["tuning s"] if tuned else [])
    rows = []
    for i, r in enumerate(ranking, 1):
        ci = f" ± {r['ci95']:.3f}" if r["ci95"] is not None else ""
        group = {True: "yes", False: "no", None: "– (one seed)"}[r["tied"]]
        cells = [str(i), r["strategy"], f"{r['mean']:.3f}{ci}", "–" if r["p"] is None else "< 0.001" if r["p"] < 0.001 else f"{r['p']:.3f}", group, f"{r['train_s']:.0f}"]
        if tuned:
            cells.append(f"{r['tuning']['train_wall_s']:.0f}" if r["tuning"] else "–")
        rows.append(cells)
    return header, rows


def ranking_title(results: dict, metric: str) -> str:
    """The ranking's heading: the results' setting (one per results dict) and the criterion."""
    return f"Ranking ({results['config'].get('setting', 'full')} setting, by {metric} at the last stage)"


def matrix_tables(results: dict) -> list[tuple[str, Table]]:
    """Each strategy's score matrix R (rows: after stage s; columns: tasks) and G, mean over seeds."""
    out = []
    for name, entry in results["strategies"].items():
        header = ["after stage", *results["tasks"]] + (["G"] if entry["G"] else [])
        rows = [[("base" if s == 0 else str(s)), *[f"{x:.3f}" for x in row]] + ([_score(entry["G"][s])] if entry["G"] else []) for s, row in enumerate(entry["R"])]
        out.append((name, (header, rows)))
    return out


def _score(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _settings_line(results: dict) -> str:
    """The base model, the config's training settings, each strategy's overrides and the date."""
    cfg = results["config"]

    def fields(d: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items())

    train = fields(cfg["train"]) if cfg.get("train") else "the defaults"
    overrides = "".join(f"; {s['name']}: {fields(s['train'])}" for s in cfg["strategies"] if s.get("train"))
    return f"Base model: {cfg['base']}. Training: {train}{overrides}. Run on {results.get('date', 'an unrecorded date')}."


def _md_table(table: Table) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *["| " + " | ".join(r) + " |" for r in rows]]


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _markdown(results: dict) -> str:
    cfg = results["config"]
    out = [f"# {cfg['name']}", "", f"Tasks, in stream order: {', '.join(results['tasks'])}. Seeds: {results['seeds']}.", _settings_line(results), ""]
    for part, title in (("summary", "Averaged over stages"), ("final", "At the last stage")):
        out += [f"## {title}", "", *_md_table((SUMMARY_HEADER, summary_rows(results, part))), ""]
    extra = sorted({p for s in results["strategies"].values() for p in s.get("probes", {})})
    if extra:
        out += ["## Further probes", "", "At the last stage, with the change from the base model in brackets.", "",
                "| strategy | " + " | ".join(extra) + " |", "|" + "---|" * (len(extra) + 1)]  # fmt: skip
        for name, s in results["strategies"].items():
            cells = [f"{v[-1]:.3f} ({v[-1] - v[0]:+.3f})" if (v := s.get("probes", {}).get(p)) else "–" for p in extra]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    diverged = [(name, seed, d) for name, s in results["strategies"].items() for seed, d in s.get("diverged", {}).items()]
    if diverged:
        out += ["## Diverged", "", "Training hit a NaN or infinite loss; these runs are left out of the tables' metrics.", ""]
        out += [f"- {name}, seed {seed}, stage {d['stage']}: {d['message']}" for name, seed, d in diverged]
        out.append("")
    out += [f"## Score matrices ({MATRICES_OF})", ""]
    for name, table in matrix_tables(results):
        out += [f"### {name}", "", *_md_table(table), ""]
    out += [DEFINITIONS, ""]
    metric = _ranked_by(results)
    ranking = rank(results, metric)
    out += [f"## {ranking_title(results, metric)}", "", *_md_table(ranking_table(ranking, metric)), "", "**Recommendation.** " + recommendation(ranking, metric), ""]
    return "\n".join(out)


MATRICES_OF = "mean over seeds; a row per stage, a column per task, G the probe"


def _ranked_by(results: dict) -> str:
    return (results.get("tuning") or {}).get("metric", "op")


DEFINITIONS = """new = R[s][s]; retained = mean over j<s of R[s][j]; old_change = G[s] − G[0]; op = mean over j≤s of R[s][j];
bwt = mean over j<s of R[s][j] − R[j][j]; fwt = R[s−1][s] − R[0][s] (s ≥ 2). Cost of a strategy (with seeds, their mean):
train s and tokens summed over all its stages' trainings (a reused contribution counts what it cost); trainable, the
most parameters one of its trainings trained; train peak +MB, the largest rise of resident memory during one of its
trainings over the memory held when that training began; disk MB, the size of all its contributions."""


def _csv(results: dict, name: str) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    s = results["strategies"][name]
    w.writerow(["stage", *results["tasks"], "G"])
    for i, row in enumerate(s["R"]):
        w.writerow([i, *[f"{x:.4f}" for x in row], "" if s["G"] is None else f"{s['G'][i]:.4f}"])
    return buf.getvalue()


def _plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["strategies"])
    tasks = results["tasks"]
    files = []

    fig, axes = plt.subplots(
        1, len(names), figsize=(2.2 + 1.1 * len(tasks) * len(names), 1.2 + 0.6 * (len(tasks) + 1)), squeeze=False, layout="constrained"
    )
    for k, (ax, name) in enumerate(zip(axes[0], names)):
        R = results["strategies"][name]["R"]
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        ax.set_yticks(range(len(R)), (["base"] + [f"after {t}" for t in tasks])[: len(R)] if k == 0 else [])
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="test score")
    fig.suptitle("R[s][j]: score on task j (columns) after stage s (rows)")
    files.append(save_png(fig, out / "heatmaps.png"))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in names:
        s = results["strategies"][name]
        stages = per_stage(s["R"], s["G"] or [])
        xs = list(range(1, len(tasks) + 1))
        for ax, key in zip(axes, ("new", "retained", "old")):
            pts = [(x, y) for x, y in zip(xs, stages[key]) if y is not None]
            if key == "old" and s["G"]:
                pts.insert(0, (0, s["G"][0]))  # the base model's probe score
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for ax, title in zip(axes, ("new knowledge R[s][s]", "retained: mean R[s][j<s]", "old knowledge G[s] (0 = base)")):
        ax.set_title(title)
        ax.set_xlabel("stage")
        ax.set_xticks(range(0 if ax is axes[2] else 1, len(tasks) + 1))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend()
    files.append(save_png(fig, out / "knowledge_per_stage.png"))

    # Scores (higher is better, 0..1) and changes (0 is no change) on separate, labelled axes; a 0
    # is drawn as a marker at 0 (a bar of height 0 is invisible) and a missing value as "n/a".
    names = [name for name in names if not all_diverged(results, name)]  # no summary to draw
    groups = (([k for k in HEADLINE if k not in CHANGES], "score at the last stage (higher is better)"),
              ([k for k in HEADLINE if k in CHANGES], "change at the last stage (0: no change)"))
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.4 * len(HEADLINE) * max(len(names), 1) ** 0.5 + 4), 3.8),
                             width_ratios=[len(g[0]) for g in groups], layout="constrained")
    width = 0.8 / max(len(names), 1)
    for ax, (keys, label) in zip(axes, groups):
        for i, name in enumerate(names):
            s_ = results["strategies"][name]
            agg = s_.get("aggregate", {}).get("final")
            xs = [j + i * width for j in range(len(keys))]
            vals = [s_["final"][k] for k in keys]
            errs = [(agg[k]["ci95"] or 0.0) if agg else 0.0 for k in keys]
            bars = ax.bar(xs, [v or 0.0 for v in vals], width, yerr=errs, label=name, capsize=3, color=f"C{i % 10}")
            for x, v, bar in zip(xs, vals, bars):
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="grey")
                elif v == 0:
                    ax.plot(x, 0, marker="_", ms=12, mew=2.5, color=bar.get_facecolor())
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], keys)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, 1.05)
    axes[1].margins(y=0.15)  # room around 0, where a zero is marked
    fig.suptitle("final stage summary (a zero is a flat mark, n/a a missing value)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    files.append(save_png(fig, out / "summary_final.png"))
    return files


def save_png(fig, path: Path) -> str:
    """Render to memory, then write atomically."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path.name


def _html(results: dict, images: list[str]) -> str:
    imgs = "".join(f'<p><img src="{html.escape(i)}" alt="{html.escape(i)}"></p>' for i in images)
    name = html.escape(results["config"]["name"])
    matrices = "".join(f"<h3>{html.escape(n)}</h3>{_html_table(t)}" for n, t in matrix_tables(results))
    metric = _ranked_by(results)
    ranking = rank(results, metric)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Cairn: {name}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>Cairn: {name}</h1><p>Tasks in stream order: {html.escape(', '.join(results['tasks']))}. Seeds: {results['seeds']}.</p>
<p>{html.escape(_settings_line(results))}</p>
<h2>Averaged over stages</h2>{_html_table((SUMMARY_HEADER, summary_rows(results, 'summary')))}
<h2>At the last stage</h2>{_html_table((SUMMARY_HEADER, summary_rows(results, 'final')))}
{imgs}<h2>Score matrices ({html.escape(MATRICES_OF)})</h2>{matrices}
<h2>Definitions</h2><pre>{html.escape(DEFINITIONS)}</pre>
<h2>{html.escape(ranking_title(results, metric))}</h2>{_html_table(ranking_table(ranking, metric))}
<p><strong>Recommendation.</strong> {html.escape(recommendation(ranking, metric))}</p></body></html>
"""


def write_report(results: dict, out: Path) -> None:
    """Write every report file into `out` (results.json first, so a report can be re-rendered)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    for name in results["strategies"]:
        atomic_write_text(out / f"R_{name}.csv", _csv(results, name))
    atomic_write_text(out / "summary.md", _markdown(results))
    images = _plots(results, out)
    atomic_write_text(out / "report.html", _html(results, images))


def load_results(out: Path) -> dict:
    path = Path(out) / "results.json"
    if not path.is_file():
        raise DataError(f"{path}: no such file; run `cairn run` first")
    results = read_json_object(path, "the results")
    if results.get("schema") != SCHEMA:
        raise DataError(f"{path}: results schema {results.get('schema')!r}, this Cairn reads schema {SCHEMA}")
    problem = _shape_problem(results)
    if problem:
        raise DataError(f"{path}: incomplete or damaged results ({problem}); rerun `cairn run` on its config to rewrite it")
    return results


# What a report reads from results.json (extra keys are allowed: later schemas add some).
class _Cost(BaseModel):
    train_wall_s: float
    tokens: float
    trainable_params: float
    peak_mem_mb: float
    disk_mb: float

class _Strategy(BaseModel):
    R: list[list[float]]
    G: list[float | None] | None
    summary: dict[str, float | None]
    final: dict[str, float | None]
    cost: _Cost

class _Config(BaseModel):
    name: str

class _Results(BaseModel):
    config: _Config
    tasks: list[str]
    seeds: list[int]
    strategies: dict[str, _Strategy]


def _shape_problem(results: dict) -> str | None:
    """What a report needs from results.json and this one lacks (the first such), or None."""
    try:
        shaped = _Results.model_validate(results)
    except ValidationError as exc:
        e = exc.errors()[0]
        return f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
    for name, s in shaped.strategies.items():
        if not s.R or any(len(row) != len(shaped.tasks) for row in s.R):
            return f"strategies.{name}.R: expected rows of {len(shaped.tasks)} scores, one per task"
        if s.G is not None and len(s.G) != len(s.R):
            return f"strategies.{name}.G: {len(s.G)} values for {len(s.R)} stages"
        missing = [k for k in HEADLINE if k not in s.summary or k not in s.final]
        if missing:
            return f"strategies.{name}: summary or final lacks {', '.join(missing)}"
    return None
