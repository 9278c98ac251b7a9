import pytest

from cairn.evaluation.scores import mean_ci, per_stage, summarize

# 3 tasks; rows are stages 0..3.
R = [
    [0.1, 0.2, 0.0],
    [0.9, 0.3, 0.1],
    [0.6, 0.8, 0.2],
    [0.5, 0.4, 1.0],
]
G = [0.9, 0.8, 0.7, 0.6]


def test_per_stage_matches_the_definitions_by_hand():
    m = per_stage(R, G)
    assert m["new"] == [0.9, 0.8, 1.0]
    assert m["recent"] == [None, 0.6, 0.4]
    assert m["retained"] == [None, 0.6, pytest.approx(0.45)]
    assert m["old"] == G[1:]
    assert m["old_change"] == [pytest.approx(-0.1), pytest.approx(-0.2), pytest.approx(-0.3)]
    assert m["op"] == [0.9, pytest.approx(0.7), pytest.approx((0.5 + 0.4 + 1.0) / 3)]
    # bwt at 2: 0.6-0.9; at 3: mean(0.5-0.9, 0.4-0.8)
    assert m["bwt"] == [None, pytest.approx(-0.3), pytest.approx(-0.4)]
    # fwt at s >= 2: R[s-1][s] - R[0][s]: 0.3-0.2, 0.2-0.0 (at stage 1 it would be R[0][1] - R[0][1])
    assert m["fwt"] == [None, pytest.approx(0.1), pytest.approx(0.2)]


def test_summary_averages_where_defined_and_takes_the_last_stage():
    avg, final = summarize(R, G)
    assert avg["new"] == pytest.approx(0.9)
    assert avg["recent"] == pytest.approx(0.5)
    assert avg["bwt"] == pytest.approx(-0.35)
    assert avg["fwt"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2: stage 1 is left out
    assert final["retained"] == pytest.approx(0.45) and final["old_change"] == pytest.approx(-0.3)


def test_averaged_forward_transfer_leaves_out_stage_one_and_the_last_stage_keeps_its_own():
    # 4 tasks; fwt at s = R[s-1][s] - R[0][s], by hand:
    #   s=2: R[1][2] - R[0][2] = 0.5 - 0.2 = +0.3
    #   s=3: R[2][3] - R[0][3] = 0.1 - 0.3 = -0.2
    #   s=4: R[3][4] - R[0][4] = 0.6 - 0.0 = +0.6
    # averaged over stages 2..4: 0.7 / 3; with stage 1's 0 counted it would be 0.7 / 4.
    R4 = [
        [0.1, 0.2, 0.3, 0.0],
        [0.8, 0.5, 0.3, 0.1],
        [0.6, 0.9, 0.1, 0.4],
        [0.5, 0.7, 0.9, 0.6],
        [0.4, 0.6, 0.8, 1.0],
    ]
    assert per_stage(R4, [])["fwt"] == [None, pytest.approx(0.3), pytest.approx(-0.2), pytest.approx(0.6)]
    avg, final = summarize(R4, [])
    assert avg["fwt"] == pytest.approx(0.7 / 3)
    assert final["fwt"] == pytest.approx(0.6)


def test_a_one_task_stream_has_no_forward_transfer():
    avg, final = summarize([[0.2], [0.9]], [])
    assert avg["fwt"] is None and final["fwt"] is None
    assert avg["new"] == final["new"] == 0.9


def test_summary_without_a_probe_has_no_old_knowledge():
    avg, final = summarize(R, [])
    assert avg["old"] is None and final["old_change"] is None


def test_mean_ci_uses_student_t():
    one = mean_ci([0.5])
    assert one == {"mean": 0.5, "ci95": None, "n": 1}
    three = mean_ci([0.1, 0.2, 0.3])
    # sd = 0.1, t(0.975, 2) = 4.303
    assert three["mean"] == pytest.approx(0.2) and three["ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert mean_ci([None, 0.4])["n"] == 1
