from cairn.data import load_task


def test_general_probe_has_at_least_100_distinct_short_questions():
    task = load_task("probe:general")
    assert task.metric == "exact" and task.name == "probe:general"
    assert len(task.test) >= 100 and not task.train
    assert len({e.prompt for e in task.test}) == len(task.test)
    assert all(e.prompt.endswith("\nAnswer:") and 1 <= len(e.answer.split()) <= 3 for e in task.test)
