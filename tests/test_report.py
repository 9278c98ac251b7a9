from cairn.config import parse_config
from cairn.evaluation.scores import summarize
from cairn.report import HEADLINE, SUMMARY_HEADER, build_results, summary_rows, write_report


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
    from cairn.report import rank, recommendation

    ranking = rank(seeded({"a": [0.50, 0.52, 0.48], "b": [0.90, 0.91, 0.89], "c": [0.88, 0.93, 0.86]}))
    assert [r["strategy"] for r in ranking] == ["b", "c", "a"]
    assert ranking[1]["tied"] and not ranking[2]["tied"] and ranking[2]["p"] < 0.05
    sentence = recommendation(ranking)
    assert sentence.startswith("With 3 seeds, b has the highest op (0.900 ± 0.025)") and "c (p = " in sentence and "not significantly different" in sentence


def test_with_one_seed_the_recommendation_says_no_difference_can_be_called_significant():
    from cairn.report import rank, recommendation

    ranking = rank(seeded({"a": [0.5], "b": [0.9]}))
    assert ranking[1]["tied"] is None and "no difference can be called significant" in recommendation(ranking)
