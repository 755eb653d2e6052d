"""The retention table (edgeqa.evaluation.retention): ratios and the share of the gap closed, read from the
evaluate metrics files of the models in evaluate.models."""

import json

import pytest

from edgeqa.errors import StageError
from edgeqa.evaluation import retention

MODELS = ["teacher", "baseline", "sft", "distill"]


def _evals():
    base = {"split": "test", "parse_rate": 1.0, "miss_rate": 0.5, "overkill_rate": 0.1, "parameters": 3_000_000}
    return {
        "teacher": {**base, "auroc": 0.90, "type_accuracy": 0.80, "verdict_accuracy": 0.85,
                    "parameters": 150_000_000},
        "baseline": {**base, "auroc": 0.70, "type_accuracy": 0.40, "verdict_accuracy": 0.75},
        "sft": {**base, "auroc": 0.80, "type_accuracy": 0.60, "verdict_accuracy": 0.80},
        "distill": {**base, "auroc": 0.88, "type_accuracy": 0.84, "verdict_accuracy": 0.85},
    }


def test_retention_and_gap_recovered():
    res = retention.compute(_evals())
    assert res["retention"]["distill"]["auroc"] == pytest.approx(0.88 / 0.90)
    assert res["retention"]["distill"]["type_accuracy"] == pytest.approx(1.05), "above 1: better than the teacher"
    assert res["gap_recovered"]["sft"]["auroc"] == pytest.approx(0.5)
    assert res["gap_recovered"]["distill"]["auroc"] == pytest.approx(0.9)
    assert res["gap_recovered"]["sft"]["parse_rate"] is None, "no gap to recover"
    ev = _evals()
    ev["baseline"]["auroc"] = 0.95  # the small model alone beats the teacher: nothing to recover
    assert retention.compute(ev)["gap_recovered"]["distill"]["auroc"] is None
    assert res["parameter_ratio"] == pytest.approx(50.0)
    assert list(res["rows"]) == MODELS and list(res["gap_recovered"]) == ["sft", "distill"]
    assert "miss_rate" not in res["retention"]["distill"], "a ratio of a lower-is-better rate means nothing"
    md = retention.render(res)
    assert "| distill | 0.978 |" in md.replace("0.9777", "0.978")


def test_missing_or_stale_evaluation_is_named(tmp_path):
    ev = tmp_path / "evaluate"
    for name, m in _evals().items():
        (ev / name).mkdir(parents=True)
        (ev / name / "metrics.json").write_text(json.dumps(m))
    out = retention.run(MODELS, "test", ev, tmp_path / "m.json", tmp_path / "r.md")
    assert out["rows"]["sft"]["auroc"] == 0.80 and (tmp_path / "r.md").read_text().startswith("# The seed")
    assert list(retention.run(["teacher", "baseline", "distill"], "test", ev)["rows"]) == \
        ["teacher", "baseline", "distill"], "the rows are evaluate.models, in order"
    with pytest.raises(StageError, match=r"lacks \['baseline'\]"):
        retention.run(["teacher", "sft"], "test", ev)
    (ev / "sft" / "metrics.json").write_text(json.dumps({**_evals()["sft"], "split": "val"}))
    with pytest.raises(StageError, match="evaluate@sft"):
        retention.run(MODELS, "test", ev)
    (ev / "sft" / "metrics.json").write_text(json.dumps(_evals()["sft"]))
    (ev / "distill" / "metrics.json").unlink()
    with pytest.raises(StageError, match="evaluate@distill"):
        retention.run(MODELS, "test", ev)
