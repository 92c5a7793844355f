import pytest

from mezo_dist.metrics_text import accuracy, exact_match, f1, generation_scores, normalize_answer


@pytest.mark.parametrize("text,expected", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a   cat,  an apple and THE dog. ", "cat apple and dog"),
    ("theater", "theater"),  # "the" inside a word is not an article
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("the Eiffel Tower", ["Eiffel tower"]) == 1.0
    assert exact_match("Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", ["Eiffel tower"]) == 0.0


def test_f1_partial_overlap_by_hand():
    # pred tokens {in, paris, france}, gold {paris}: precision 1/3, recall 1.
    assert f1("in Paris France", ["Paris"]) == pytest.approx(2 * (1 / 3 * 1) / (1 / 3 + 1))
    assert f1("in Paris France", ["Paris"]) == pytest.approx(0.5)
    # Repeated tokens count once per match: pred {the->dropped, cat, cat}, gold {cat}: p 1/2, r 1.
    assert f1("cat cat", "the cat") == pytest.approx(2 / 3)


def test_multiple_gold_answers_take_the_max():
    golds = ["London", "Paris", "in Paris France today"]
    assert exact_match("Paris", golds) == 1.0
    # vs "Paris": p 1/2, r 1 -> 2/3; vs "in Paris France today": p 1, r 1/2 -> 2/3; vs "London": 0.
    assert f1("Paris France", golds) == pytest.approx(2 / 3)
    assert f1("Paris France", ["London", "Paris France"]) == 1.0
    assert f1("in Paris France today", golds) == 1.0


def test_empty_prediction_scores_zero():
    assert f1("", ["Paris"]) == 0.0
    assert exact_match("", ["Paris"]) == 0.0
    # A prediction of only articles/punctuation normalizes to nothing as well.
    assert f1("the.", ["Paris"]) == 0.0


def test_no_gold_answer_is_an_error():
    with pytest.raises(ValueError):
        f1("x", [])
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_accuracy_and_generation_scores():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])
    with pytest.raises(ValueError):
        accuracy([], [])
    scores = generation_scores(["the Eiffel Tower", "in Paris France"], [["Eiffel tower"], ["Paris", "Lyon"]])
    assert scores["exact_match"] == 0.5
    assert scores["f1"] == pytest.approx((1.0 + 0.5) / 2)
