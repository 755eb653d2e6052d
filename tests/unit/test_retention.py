"""The retention table (tasks/retention.py): ratios and the share of the gap closed, read from metrics files."""

import json

import pytest

from tasks import retention
from tasks.common import StageError


def _evals():
    base = {"split": "test", "parse_rate": 1.0, "miss_rate": 0.5, "overkill_rate": 0.1}
    return {
        "teacher": {**base, "auroc": 0.90, "type_accuracy": 0.80, "verdict_accuracy": 0.85},
        "baseline": {**base, "auroc": 0.70, "type_accuracy": 0.40, "verdict_accuracy": 0.75},
        "sft": {**base, "auroc": 0.80, "type_accuracy": 0.60, "verdict_accuracy": 0.80},
        "distill": {**base, "auroc": 0.88, "type_accuracy": 0.84, "verdict_accuracy": 0.85},
    }


def test_retention_and_gap_recovered():
    res = retention.compute(_evals(), {"sft": {"teacher_parameters": 150_000_000, "parameters": 3_000_000},
                                       "distill": {"parameters": 3_000_000, "seconds": 12.5}})
    assert res["retention"]["distill"]["auroc"] == pytest.approx(0.88 / 0.90)
    assert res["retention"]["distill"]["type_accuracy"] == pytest.approx(1.05), "above 1: better than the teacher"
    assert res["gap_recovered"]["sft"]["auroc"] == pytest.approx(0.5)
    assert res["gap_recovered"]["distill"]["auroc"] == pytest.approx(0.9)
    assert res["gap_recovered"]["sft"]["parse_rate"] is None, "no gap to recover"
    ev = _evals()
    ev["baseline"]["auroc"] = 0.95  # the small model alone beats the teacher: nothing to recover
    assert retention.compute(ev, {})["gap_recovered"]["distill"]["auroc"] is None
    assert res["parameter_ratio"] == pytest.approx(50.0)
    assert res["rows"]["distill"]["train_seconds"] == 12.5
    assert "miss_rate" not in res["retention"]["distill"], "a ratio of a lower-is-better rate means nothing"
    md = retention.render(res)
    assert "| distill | 0.978 |" in md.replace("0.9777", "0.978")


def test_missing_or_stale_evaluation_is_named(tmp_path, params):
    ev = tmp_path / "evaluate"
    for name, m in _evals().items():
        (ev / name).mkdir(parents=True)
        (ev / name / "metrics.json").write_text(json.dumps(m))
    out = retention.run(params, ev, tmp_path / "m.json", tmp_path / "r.md")
    assert out["rows"]["sft"]["auroc"] == 0.80 and (tmp_path / "r.md").read_text().startswith("# The seed")
    (ev / "sft" / "metrics.json").write_text(json.dumps({**_evals()["sft"], "split": "val"}))
    with pytest.raises(StageError, match="evaluate@sft"):
        retention.run(params, ev)
    (ev / "sft" / "metrics.json").write_text(json.dumps(_evals()["sft"]))
    (ev / "distill" / "metrics.json").unlink()
    with pytest.raises(StageError, match="evaluate@distill"):
        retention.run(params, ev)
