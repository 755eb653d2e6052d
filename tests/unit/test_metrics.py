"""The evaluation metrics (edgeqa.evaluation.metrics) and the figure computation of the evaluate stage."""

import numpy as np
import pandas as pd
import pytest

from edgeqa.evaluation import metrics as M
from edgeqa.evaluation.evaluate import compute, render

SIZES = ["tiny", "small", "medium", "large"]


def test_verdict_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.4, 0.05])
    m = M.verdict_metrics(y, pred, p)
    assert m["verdict_accuracy"] == 6 / 8
    assert m["miss_rate"] == 1 / 3 and m["overkill_rate"] == 1 / 5
    assert m["verdict_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["auroc"] == pytest.approx(13 / 15)  # 15 (defective, good) pairs, 2 ranked wrong


def test_metrics_the_data_cannot_support_are_none_not_zero():
    y = np.zeros(4, int)
    m = M.verdict_metrics(y, np.zeros(4, int), np.full(4, 0.2))
    assert m["auroc"] is None and m["miss_rate"] is None and m["verdict_f1"] is None
    assert m["overkill_rate"] == 0.0 and m["verdict_accuracy"] == 1.0
    assert M.class_accuracy([], [], ["a"])["accuracy"] is None
    assert M.bootstrap_delta_auroc(y, np.zeros(4), np.ones(4), 50, 0)["delta"] is None
    assert M.roc_points(y, np.zeros(4)) == []


def test_class_accuracy_macro_and_per_class():
    t = ["a", "a", "a", "a", "b"]
    q = ["a", "a", "a", "a", "a"]
    r = M.class_accuracy(t, q, ["a", "b", "c"])
    assert r["accuracy"] == 0.8 and r["per_class"] == {"a": 1.0, "b": 0.0} and r["macro"] == 0.5


def test_grid_words_match_whole_phrases():
    assert M.grid_words_in("in the upper left region") == {"upper left"}
    assert M.grid_words_in("on the left, not the center") == {"left", "center"}
    assert M.grid_words_in("leftover topping") == set()
    assert M.names_type("a thin crack runs across", "crack") and not M.names_type("cracked", "crack")
    assert M.names_type("broken glass", "broken_glass")
    good = "no defect is visible: the surface is even and intact, with no crack, hole or stain"
    assert not M.names_type(good, "crack", ["crack", "hole", "stain"]), "a list of absent types names none"
    assert M.names_type("crack defect: small", "crack", ["crack", "hole", "stain"])


def test_stated_attributes_read_the_reference_wording():
    ref = ("crack defect: small, elongated and running diagonally, in the upper left region, darker than the "
           "surrounding surface, one region covering 0.6% of the image")
    assert M.stated_attributes(ref, SIZES) == {"size_class": "small", "n_regions": "1", "orientation": "diagonal",
                                               "polarity": "darker"}
    compact = "hole defect: tiny and compact, in the center region, similar in tone to the surrounding surface, " \
              "3 regions covering 0.1% of the image"
    assert M.stated_attributes(compact, SIZES) == {"size_class": "tiny", "n_regions": "3", "orientation": "none",
                                                   "polarity": "similar"}
    assert M.stated_attributes("it looks small or large", SIZES) == {}, "ambiguous statements are not guessed"
    acc = M.attribute_accuracy([ref, "no words about it"], [
        {"size_class": "small", "n_regions": "1", "orientation": "vertical", "polarity": "darker"},
        {"size_class": "tiny", "n_regions": "2", "orientation": "none", "polarity": "brighter"}], SIZES)
    assert acc["size_class"] == {"n": 2, "stated_rate": 0.5, "accuracy_when_stated": 1.0}
    assert acc["orientation"]["accuracy_when_stated"] == 0.0


def test_bootstrap_interval_brackets_the_delta_and_is_reproducible():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40), np.zeros(60)].astype(int)
    weak = y * 0.3 + rng.normal(0, 0.5, 100)
    strong = y * 1.5 + rng.normal(0, 0.5, 100)
    r1 = M.bootstrap_delta_auroc(y, weak, strong, 300, 1)
    r2 = M.bootstrap_delta_auroc(y, weak, strong, 300, 1)
    assert r1 == r2 and r1["resamples"] == 300
    assert r1["ci_low"] < r1["delta"] < r1["ci_high"] and r1["ci_low"] > 0, r1


def test_agreement():
    a = [{"verdict": "good", "type": None, "location": None}, {"verdict": "defective", "type": "x", "location": "top"}]
    b = [{"verdict": "good", "type": None, "location": None}, {"verdict": "defective", "type": "y", "location": "top"}]
    assert M.agreement(a, b) == {"verdict": 1.0, "closed_fields": 0.5}


def _rows():
    return pd.DataFrame({
        "sha256": ["1", "2", "3", "4"], "label": ["defective", "defective", "good", "good"],
        "defect_type": ["crack", "hole", None, None], "location": ["upper left", "center", None, None],
        "size_class": ["small", "tiny", None, None], "n_regions": pd.array([1, 2, None, None], dtype="Int64"),
        "orientation": ["diagonal", "none", None, None], "polarity": ["darker", "brighter", None, None],
        "reason": ["r1", "r2", "r3", "r4"]})


def _rec(sha, verdict, t, loc, reason, p, tp=None):
    return {"sha256": sha, "verdict": verdict, "type": t, "location": loc, "reason": reason, "p_defective": p,
            "p_defective_lm": None, "parse_ok": True, "generated_tokens": 5,
            "type_probs": tp, "location_probs": None}


def test_compute_type_location_reason_figures():
    recs = [_rec("1", "defective", "crack", "upper left",
                 "crack defect: small and compact, in the upper left region, darker than the surface", 0.9),
            _rec("2", "good", None, None, "no defect is visible, no crack or hole", 0.4,
                 tp={"crack": 0.4, "hole": 0.6}),
            _rec("3", "good", None, None, "no defect is visible", 0.1),
            _rec("4", "defective", "crack", "top", "crack defect in the top region", 0.6)]
    m = compute(_rows(), recs, ("crack", "hole"), SIZES, np.array([0.9, 0.5, 1.0, 0.2]), 100, 0)
    assert m["verdict_accuracy"] == 0.5 and m["miss_rate"] == 0.5 and m["overkill_rate"] == 0.5
    assert m["auroc"] == 0.75
    assert m["type_accuracy"] == 1.0, "a missed defect's type comes from its type distribution"
    assert m["type_accuracy_in_answer"] == 0.5, "the answer of a missed defect states no type"
    assert m["location_accuracy"] == 0.5 and m["reason_names_type_and_location"] == 0.5
    assert m["reason_names_type"] == 0.5, "the missed defect's 'no crack or hole' names no type"
    assert m["reason_agrees_with_answer"] == 1.0 and m["reason_agrees_with_answer_defective"] == 1.0
    attrs = m["reason_attributes"]
    assert attrs["size_class"]["accuracy_when_stated"] == 1.0 and attrs["orientation"]["accuracy_when_stated"] == 0.0
    assert m["reason_similarity_defective"] == pytest.approx(0.7) and m["reason_similarity_good"] == pytest.approx(0.6)
    assert m["auroc_lm_alone"] is None and m["parse_rate"] == 1.0
    text = render("m", "test", m)
    assert "| auroc | 0.75 |" in text and "n/a" in text


def test_compute_without_types_or_masks_reports_na():
    rows = _rows().assign(defect_type=None, location=None, size_class=None)
    recs = [_rec(s, "good", None, None, "fine", 0.5) for s in rows.sha256]
    m = compute(rows, recs, (), SIZES, None, 0, 0)
    for k in ("type_accuracy", "location_accuracy", "reason_names_type", "reason_names_location",
              "reason_attributes", "reason_similarity", "reason_agrees_with_answer_defective"):
        assert m[k] is None, k


def test_compute_refuses_misaligned_predictions():
    from edgeqa.errors import StageError

    recs = [_rec(s, "good", None, None, "fine", 0.5) for s in ["2", "1", "3", "4"]]
    with pytest.raises(StageError, match="not aligned"):
        compute(_rows(), recs, (), SIZES, None, 0, 0)


def test_reason_agrees_with_the_answers_own_fields():
    types = ("crack", "hole", "stain")
    agrees = M.reason_agrees
    assert agrees("defective", "crack", "upper left", "a thin crack in the upper left region", types)
    assert not agrees("defective", "crack", "upper left", "a round hole in the upper left region", types)
    assert not agrees("defective", "crack", "upper left", "a crack in the lower right region", types)
    assert not agrees("defective", "crack", "top", "a crack next to a hole at the top", types), "two types named"
    assert agrees("defective", "crack", None, "a crack", types), "no location in the answer: nothing to check"
    assert agrees("good", None, None, "no defect is visible, no crack, hole or stain", types)
    assert not agrees("good", None, None, "a dark stain at the center", types), "a good answer pins a stain"
    assert agrees("good", None, None, "the surface is uniform", ())
