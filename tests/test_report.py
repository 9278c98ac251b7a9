from cairn.config import parse_config
from cairn.evaluation.scores import summarize
from cairn.report import HEADLINE, SUMMARY_HEADER, build_results, rank, ranking_table, recommendation, summary_rows, write_report
from cairn.sweep import format_stat


def one_run(cost: dict) -> dict:
    run = {"R": [[0.0, 0.0], [0.5, 0.0], [0.25, 0.75]], "G": [0.5, 0.5, 0.4], "cost": cost}
    run["summary"], run["final"] = summarize(run["R"], run["G"])
    return run


def results_of(**costs) -> dict:
    cfg = parse_config({"name": "costs", "base": "tiny-random", "tasks": ["alpha.jsonl", "beta.jsonl"],
                        "strategies": [{"name": name, "kind": "sequential"} for name in costs]})  # fmt: skip
    return build_results(cfg, ["alpha", "beta"], {name: {0: one_run(cost)} for name, cost in costs.items()})


COST = {"train_wall_s": 12.4, "tokens": 3000, "trainable_params": 4096, "peak_mem_mb": 251.6, "disk_mb": 7.0, "run_wall_s": 20.0}


def test_the_cost_columns_say_which_are_sums_over_stages_and_which_the_largest_training():
    assert SUMMARY_HEADER[len(HEADLINE) + 1 :] == ["train s (all stages)", "tokens (all stages)", "trainable (max)", "train peak +MB (max)", "disk MB (all)"]
    row = summary_rows(results_of(seq=COST))[0]
    assert row[len(HEADLINE) + 1 :] == ["12", "3000", "4.1e+03", "252", "7"]


def test_the_summary_explains_the_cost_as_sums_over_stages_and_the_memory_as_each_trainings_own(tmp_path):
    write_report(results_of(seq=COST), tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "| strategy | new | retained | old_change | op | bwt | fwt | train s (all stages) | tokens (all stages) |" in summary
    text = " ".join(summary.split())  # the definitions wrap over lines
    assert "of one stage" not in text
    assert "train s and tokens summed over all its stages' trainings" in text
    assert "train peak +MB, the largest rise of resident memory during one of its trainings over the memory held when that training began" in text
    assert "fwt = R[s−1][s] − R[0][s] (s ≥ 2)" in text
    html = (tmp_path / "report.html").read_text()
    assert "<th>train peak +MB (max)</th>" in html and "summed over all its stages" in " ".join(html.split())


def seeded(scores: dict[str, list[float]]) -> dict:
    """A results dict whose strategies scored `scores` (op at the last stage), one value per seed."""
    def entry(values):
        runs = {str(i): {"final": {"op": v}, "cost": {"train_wall_s": 1.0}} for i, v in enumerate(values)}
        return {"final": {"op": sum(values) / len(values)}, "cost": {"train_wall_s": 1.0}, **({"seeds": runs} if len(values) > 1 else {})}

    return {"config": {"setting": "full"}, "strategies": {name: entry(v) for name, v in scores.items()}}


def test_the_ranking_groups_the_strategies_not_significantly_different_from_the_best():
    ranking = rank(seeded({"a": [0.50, 0.52, 0.48], "b": [0.90, 0.91, 0.89], "c": [0.88, 0.93, 0.86]}))
    assert [r["strategy"] for r in ranking] == ["b", "c", "a"]
    assert ranking[1]["tied"] and not ranking[2]["tied"] and ranking[2]["p"] < 0.05
    sentence = recommendation(ranking)
    assert sentence.startswith("With 3 seeds, b has the highest op (0.900 ± 0.025)") and "c (p = " in sentence and "not significantly different" in sentence


def test_with_one_seed_the_recommendation_says_no_difference_can_be_called_significant():
    ranking = rank(seeded({"a": [0.5], "b": [0.9]}))
    assert ranking[1]["tied"] is None and "no difference can be called significant" in recommendation(ranking)


def seeds_of(scores: dict[str, list[float]]) -> dict:
    """A two-task results dict from build_results: strategy -> its stage-1 score on task 1, per seed."""
    def run(x):
        r = {"R": [[0.0, 0.0], [x, 0.0], [x / 2, 0.75]], "G": [0.5, 0.5, 0.4], "cost": COST}
        r["summary"], r["final"] = summarize(r["R"], r["G"])
        return r

    cfg = parse_config({"name": "demo", "base": "tiny-random", "tasks": ["alpha.jsonl", "beta.jsonl"], "seeds": [0, 1, 2], "train": {"epochs": 2},
                        "strategies": [{"name": n, "kind": "sequential", **({"train": {"lr": 1e-3}} if n == "slow" else {})} for n in scores]})  # fmt: skip
    return build_results(cfg, ["alpha", "beta"], {n: {i: run(x) for i, x in enumerate(v)} for n, v in scores.items()})


def test_the_summary_names_base_training_and_date_shows_the_matrices_and_ends_with_the_ranking(tmp_path):
    results = seeds_of({"seq": [0.5, 0.6, 0.55], "slow": [0.9, 0.8, 0.85]})
    write_report(results, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert f"Base model: tiny-random. Training: epochs: 2; slow: lr: 0.001. Run on {results['date']}." in summary
    assert "## Score matrices (mean over seeds; " in summary and "| after stage | alpha | beta | G |\n|---|---|---|---|\n| base | 0.000 | 0.000 | 0.500 |\n| 1 | 0.850 | 0.000 | 0.500 |" in summary
    ranking = summary[summary.index("## Ranking (full setting, by op at the last stage)"):]
    assert "| 1 | slow | 0.588 ± 0.031 | – | yes | 12 |" in ranking and "| 2 | seq | 0.512 ± 0.031 | 0.00" in ranking
    assert summary.rstrip().endswith("With 3 seeds, slow has the highest op (0.588 ± 0.031), significantly above every other strategy (Welch's t-test, p < 0.05): use it.")
    html = (tmp_path / "report.html").read_text()
    assert html.index("<h3>slow</h3>") < html.index("Ranking (full setting") < html.index("significantly above every other strategy") and "Training: epochs: 2" in html


def test_scores_print_without_a_sign_and_changes_with_one():
    row = summary_rows(seeds_of({"seq": [0.5, 0.6, 0.55]}), "final")[0]
    new, old_change = row[1 + HEADLINE.index("new")], row[1 + HEADLINE.index("old_change")]
    assert new == "0.750 ± 0.000" and old_change == "-0.100 ± 0.000" and row[1 + HEADLINE.index("fwt")] == "+0.000 ± 0.000"
    assert format_stat({"mean": 0.5, "ci95": 0.1}) == "0.500 ± 0.100" and format_stat({"mean": 0.5, "ci95": None}, signed=True) == "+0.500"


def test_a_tuned_strategy_shows_its_tuning_seconds_beside_the_training_seconds():
    results = seeded({"a": [0.5, 0.6], "b": [0.7, 0.8]})
    results["strategies"]["b"]["tuning"] = {"points": 4, "train_wall_s": 321.0}
    header, rows = ranking_table(rank(results))
    assert header[-2:] == ["train s", "tuning s"] and rows[0][-1] == "321" and rows[1][-1] == "–"
    assert ranking_table(rank(seeded({"a": [0.5, 0.6]})))[0][-1] == "train s"


def test_a_p_too_small_to_print_in_three_decimals_reads_below_one_in_a_thousand():
    header, rows = ranking_table(rank(seeded({"best": [0.90, 0.91, 0.92], "worst": [0.10, 0.11, 0.12]})))
    assert rows[1][header.index("p vs best")] == "< 0.001" and rows[1][header.index("same group as the best")] == "no"


def test_the_final_plot_marks_a_zero_and_writes_n_a_for_a_missing_value_on_separate_axes(tmp_path, monkeypatch):
    import cairn.report as report

    figures = []
    monkeypatch.setattr(report, "save_png", lambda fig, path: figures.append(fig) or path.name)
    write_report(results_of(seq=COST), tmp_path)  # two stages: fwt is 0.0 at the last stage
    one_task = results_of(seq=COST)
    one_task["strategies"]["seq"]["final"]["fwt"] = None
    report._plots(one_task, tmp_path)
    scores, changes = figures[2].axes[:2]
    assert "higher is better" in scores.get_ylabel() and "0: no change" in changes.get_ylabel()
    assert any(list(line.get_ydata()) == [0] for line in changes.get_lines())  # the zero fwt: a mark at 0
    assert "n/a" in [t.get_text() for t in figures[-1].axes[1].texts]
