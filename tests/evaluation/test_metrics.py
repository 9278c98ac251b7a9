import pytest

from cairn.evaluation.metrics import choice, edit_sim, exact, normalize, rouge_l, sari, score


def test_exact_normalises_case_whitespace_and_surrounding_punctuation():
    assert normalize("  The  Cat. ") == "the cat"
    assert exact(" Paris.", "paris") == 1.0
    assert exact("Paris, France", "Paris") == 0.0
    assert exact("", "a") == 0.0


def test_choice_compares_first_non_space_character():
    assert choice("  B) hawkish", "B") == 1.0
    assert choice("b", "B") == 1.0
    assert choice("A", "B") == 0.0
    assert choice("   ", "B") == 0.0


def test_rouge_l_is_lcs_f1():
    # LCS "the cat on the mat" = 5 tokens of 6 on each side.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("completely different", "the cat") == 0.0


def test_edit_sim_is_indel_ratio():
    # kitten / sitting: longest common subsequence "ittn" (4), lengths 6 + 7.
    assert edit_sim("kitten", "sitting") == pytest.approx(8 / 13)
    assert edit_sim("abc", "abc") == 1.0


def test_sari_hand_computed():
    # source "the cat sat", prediction "the cat", reference "cat sat":
    # keep F1 per order 1..4 = 0.5, 0, 1, 1; deletion precision = 0, 0, 1, 1; addition F1 = 1 each.
    assert sari("the cat", "cat sat", "the cat sat") == pytest.approx((0.625 + 0.5 + 1.0) / 3)
    assert sari("a c", "a c", "a b") == pytest.approx(1.0)


def test_sari_matches_the_published_multi_reference_example():
    # The example in the Hugging Face `evaluate` SARI card: 26.9536... / 100.
    refs = ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."]
    assert sari("About 95 you now get in.", refs, "About 95 species are currently accepted.") == pytest.approx(0.26953601953601954)


def test_score_dispatches_by_name():
    assert score("exact", "x", "X") == 1.0
    assert score("sari", "the cat", "cat sat", "the cat sat") == pytest.approx(0.70833333)
