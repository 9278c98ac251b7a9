from cairn.data import load_task


def test_general_probe_has_at_least_100_distinct_short_questions():
    task = load_task("probe:general")
    questions = task.eval + task.test
    assert task.metric == "exact" and task.name == "probe:general"
    assert len(questions) >= 100 and not task.train
    assert len({e.prompt for e in questions}) == len(questions)
    assert all(e.prompt.endswith("\nAnswer:") and 1 <= len(e.answer.split()) <= 3 for e in questions)


def test_the_general_probe_is_split_into_an_eval_half_and_a_test_half_that_share_no_question():
    task = load_task("probe:general")
    assert abs(len(task.eval) - len(task.test)) <= 1 and len(task.test) >= 60  # the quickstart scores 60 of the test half
    assert not {e.prompt for e in task.eval} & {e.prompt for e in task.test}
