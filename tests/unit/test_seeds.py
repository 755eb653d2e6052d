import numpy as np
import pytest

from edgeqa.evaluation.seeds import _auroc, accuracy, bootstrap_seeds_delta


def _scores(rng, y, signal, seeds):
    return np.stack([y * signal + rng.normal(0, 1, len(y)) for _ in range(seeds)])


def test_a_row_against_itself_has_a_zero_delta_and_a_zero_interval():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(40)].astype(int)
    a = _scores(rng, y, 1.0, 3)
    r = bootstrap_seeds_delta(y, a, a.copy(), _auroc, 200, 0)
    assert r["delta"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["mean_a"] == r["mean_b"] and r["resamples"] == 200


def test_a_clearly_better_row_has_an_interval_above_zero_and_a_worse_one_below():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(30), np.zeros(60)].astype(int)
    weak, strong = _scores(rng, y, 0.3, 5), _scores(rng, y, 3.0, 5)
    up = bootstrap_seeds_delta(y, weak, strong, _auroc, 300, 0)
    assert up["delta"] > 0.2 and up["ci_low"] > 0 and up["ci_low"] <= up["delta"] <= up["ci_high"]
    assert up["mean_b"] - up["mean_a"] == pytest.approx(up["delta"])
    down = bootstrap_seeds_delta(y, strong, weak, _auroc, 300, 0)
    assert down["delta"] == pytest.approx(-up["delta"]) and down["ci_high"] < 0


def test_seed_variance_widens_the_interval():
    """The interval resamples seeds too: rows whose seeds disagree get a wider interval than steady rows."""
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(30), np.zeros(60)].astype(int)
    base = _scores(rng, y, 1.0, 5)
    steady = _scores(rng, y, 1.5, 5)
    swinging = np.stack([y * s + rng.normal(0, 1, len(y)) for s in (0.2, 3.0, 0.2, 3.0, 1.5)])
    w_steady = np.subtract(*[bootstrap_seeds_delta(y, base, steady, _auroc, 300, 0)[k] for k in ("ci_high", "ci_low")])
    w_swing = np.subtract(*[bootstrap_seeds_delta(y, base, swinging, _auroc, 300, 0)[k] for k in ("ci_high", "ci_low")])
    assert w_swing > w_steady


def test_resamples_with_one_class_only_are_skipped_not_counted():
    y = np.r_[np.ones(1), np.zeros(9)].astype(int)
    a = np.tile(np.linspace(0, 1, 10), (2, 1))
    r = bootstrap_seeds_delta(y, a, a[:, ::-1].copy(), _auroc, 300, 0)
    assert 0 < r["resamples"] < 300  # about (9/10)^10 of the image resamples lack the one defect


def test_type_accuracy_deltas_and_bad_shapes():
    truth = np.array(["crack", "hole", "crack", "stain"], dtype=object)
    a = np.array([["crack", "crack", "crack", "crack"]] * 2, dtype=object)   # 0.5
    b = np.array([["crack", "hole", "crack", "stain"]] * 2, dtype=object)    # 1.0
    r = bootstrap_seeds_delta(truth, a, b, accuracy, 100, 0)
    assert r["delta"] == pytest.approx(0.5) and r["mean_a"] == 0.5 and r["mean_b"] == 1.0
    assert accuracy(np.array([]), np.array([])) is None
    with pytest.raises(ValueError, match="4 images"):
        bootstrap_seeds_delta(truth, a, b[:1], accuracy, 10, 0)
