"""Stage `retention`: the seed's experiment as one table. Every model of `evaluate.models`, in that order,
beside the teacher: `baseline` (human labels only), `sft` (with the teacher's labels), `distill` (after KD),
and any later rows. Each row comes from its `evaluate` stage on the same split. Retention = row metric /
teacher metric; "gap recovered" = (row - baseline) / (teacher - baseline), the share of the small model's gap
to the teacher that a step closes. Nothing is recomputed here: every figure is read from the evaluate stage's
metrics files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text, write_json
from edgeqa.report import fmt, md_table

log = logging.getLogger("edgeqa.retention")
TEACHER, BASELINE = "teacher", "baseline"  # the two reference rows every table needs
METRICS = ("auroc", "verdict_accuracy", "verdict_f1", "miss_rate", "overkill_rate", "type_accuracy",
           "location_accuracy", "reason_names_type_and_location", "reason_agrees_with_answer", "reason_similarity",
           "parse_rate")
LOWER_IS_BETTER = {"miss_rate", "overkill_rate"}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute(evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The table from each model's evaluate metrics, rows in the order of `evals`."""
    t, base = evals[TEACHER], evals[BASELINE]
    out: dict[str, Any] = {"split": t.get("split"), "rows": {}, "retention": {}, "gap_recovered": {}}
    for name, e in evals.items():
        row = {m: e.get(m) for m in METRICS}
        row["images_per_s"] = e.get("images_per_s")
        row["parameters"] = e.get("parameters")
        out["rows"][name] = row
        if name == TEACHER:
            continue
        out["retention"][name] = {m: _ratio(e.get(m), t.get(m)) for m in METRICS if m not in LOWER_IS_BETTER}
        if name == BASELINE:
            continue
        gaps: dict[str, float | None] = {}
        for m in METRICS:
            tv, bv, v = t.get(m), base.get(m), e.get(m)
            if tv is None or bv is None or v is None:
                gaps[m] = None
                continue
            teacher_better = (tv < bv) if m in LOWER_IS_BETTER else (tv > bv)
            # no gap to recover where the baseline already matches or beats the teacher
            gaps[m] = (v - bv) / (tv - bv) if teacher_better else None
        out["gap_recovered"][name] = gaps
    out["parameter_ratio"] = _ratio(t.get("parameters"), base.get("parameters"))
    return out


def render(res: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return fmt(v, 3)

    names = list(res["rows"])
    head = ["row", *METRICS, "images_per_s", "parameters"]
    rows = [[n, *[f(res["rows"][n][m]) for m in head[1:]]] for n in names]
    kept = [m for m in METRICS if m not in LOWER_IS_BETTER]
    ret = [[n, *[f(res["retention"][n].get(m)) for m in kept]] for n in res["retention"]]
    gap = [[n, *[f(res["gap_recovered"][n][m]) for m in METRICS]] for n in res["gap_recovered"]]
    return ("# The seed's experiment: teacher, small model, + SFT, + KD\n\n"
            f"Split `{res['split']}`. The baseline student has {f(res['rows'][BASELINE]['parameters'])} parameters, "
            f"{f(res['parameter_ratio'])}x fewer than the teacher.\n\n"
            + md_table(head, rows)
            + "\n\n## Retention (row / teacher; above 1: the row is better)\n\n"
            + md_table(["row", *kept], ret)
            + "\n\n## Share of the baseline's gap to the teacher closed ((row - baseline) / (teacher - baseline); "
              "negative: worse than the baseline; n/a: no gap, the baseline already matches or beats the teacher)\n\n"
            + md_table(["row", *METRICS], gap) + "\n")


def run(models: Sequence[str], split: str, evaluations: Path, metrics: Path | None = None,
        report: Path | None = None) -> dict[str, Any]:
    """The table for `models` (evaluate.models) from `evaluations/<model>/metrics.json`, all on `split`."""
    missing = [r for r in (TEACHER, BASELINE) if r not in models]
    if missing:
        raise StageError(f"evaluate.models {list(models)} lacks {missing}: the retention table compares every row "
                         f"with the teacher and the human-labels-only baseline")
    evals = {}
    for name in models:
        f = evaluations / name / "metrics.json"
        if not f.is_file():
            raise StageError(f"{f} is missing: the retention table needs evaluate@{name} (in evaluate.models)")
        evals[name] = json.loads(f.read_text())
        if evals[name].get("split") != split:
            raise StageError(f"{f} is for split {evals[name].get('split')!r}, not evaluate.split "
                             f"{split!r}: rerun evaluate@{name}")
    res = compute(evals)
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, render(res))
    last = list(res["retention"])[-1]
    log.info("retention: %s AUROC retention %s", last, res["retention"][last].get("auroc"))
    return res
