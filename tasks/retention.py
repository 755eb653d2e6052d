"""Stage `retention`: the seed's experiment as one table. The same student architecture in three rows
(`baseline`: human labels only; `sft`: with the teacher's labels; `distill`: after KD) beside the teacher, each
from its `evaluate` stage on the same split. Retention = student metric / teacher metric; "gap recovered" =
(row - baseline) / (teacher - baseline), the share of the small model's gap to the teacher that a step closes.
Nothing is recomputed here: every figure is read from the evaluate and training stages' metrics files.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from tasks.common import StageError, atomic_write_text, md_table, stage_main, write_json
from tasks.config import Params, load_params

log = logging.getLogger("edgeqa.retention")
ROWS = ("teacher", "baseline", "sft", "distill")
METRICS = ("auroc", "verdict_accuracy", "verdict_f1", "miss_rate", "overkill_rate", "type_accuracy",
           "location_accuracy", "reason_names_type_and_location", "reason_similarity", "parse_rate")
LOWER_IS_BETTER = {"miss_rate", "overkill_rate"}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute(evals: dict[str, dict[str, Any]], training: dict[str, dict[str, Any]]) -> dict[str, Any]:
    t, base = evals["teacher"], evals["baseline"]
    out: dict[str, Any] = {"split": t.get("split"), "rows": {}, "retention": {}, "gap_recovered": {}}
    for name in ROWS:
        e = evals[name]
        row = {m: e.get(m) for m in METRICS}
        row["images_per_s"] = e.get("images_per_s")
        row["parameters"] = (training.get(name, {}).get("parameters") if name != "teacher"
                             else training.get("sft", {}).get("teacher_parameters"))
        row["train_seconds"] = training.get(name, {}).get("seconds")
        out["rows"][name] = row
        if name == "teacher":
            continue
        out["retention"][name] = {m: _ratio(e.get(m), t.get(m)) for m in METRICS if m not in LOWER_IS_BETTER}
        gaps = {}
        for m in METRICS:
            tv, bv, v = t.get(m), base.get(m), e.get(m)
            teacher_better = None not in (tv, bv) and ((tv < bv) if m in LOWER_IS_BETTER else (tv > bv))
            # no gap to recover where the baseline already matches or beats the teacher
            gaps[m] = (v - bv) / (tv - bv) if teacher_better and v is not None else None
        out["gap_recovered"][name] = gaps
    ps = out["rows"]["distill"]["parameters"]
    pt = out["rows"]["teacher"]["parameters"]
    out["parameter_ratio"] = _ratio(pt, ps)
    return out


def _f(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int) and v > 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def render(res: dict[str, Any]) -> str:
    head = ["row", *METRICS, "images_per_s", "parameters", "train_seconds"]
    rows = [[n, *[_f(res["rows"][n][m]) for m in head[1:]]] for n in ROWS]
    ret = [[n, *[_f(res["retention"][n].get(m)) for m in METRICS if m not in LOWER_IS_BETTER]] for n in ROWS[1:]]
    gap = [[n, *[_f(res["gap_recovered"][n][m]) for m in METRICS]] for n in ROWS[2:]]
    return ("# The seed's experiment: teacher, small model, + SFT, + KD\n\n"
            f"Split `{res['split']}`. The three student rows are one architecture "
            f"({_f(res['rows']['distill']['parameters'])} parameters, "
            f"{_f(res['parameter_ratio'])}x fewer than the teacher).\n\n"
            + md_table(head, rows)
            + "\n\n## Retention (student / teacher; above 1: the student is better)\n\n"
            + md_table(["row", *[m for m in METRICS if m not in LOWER_IS_BETTER]], ret)
            + "\n\n## Share of the baseline's gap to the teacher closed ((row - baseline) / (teacher - baseline); "
              "negative: worse than the baseline; n/a: no gap, the baseline already matches or beats the teacher)\n\n"
            + md_table(["row", *METRICS], gap) + "\n")


def run(p: Params, evaluations: Path, metrics: Path | None = None, report: Path | None = None) -> dict[str, Any]:
    reports = evaluations.parent
    evals, training = {}, {}
    for name in ROWS:
        f = evaluations / name / "metrics.json"
        if not f.is_file():
            raise StageError(f"{f} is missing: the retention table needs evaluate@{name} (evaluate.models.{name})")
        evals[name] = json.loads(f.read_text())
        if evals[name].get("split") != p.evaluate.split:
            raise StageError(f"{f} is for split {evals[name].get('split')!r}, not evaluate.split "
                             f"{p.evaluate.split!r}: rerun evaluate@{name}")
        tf = reports / name / "metrics.json"
        if name != "teacher" and tf.is_file():
            training[name] = json.loads(tf.read_text())
    res = compute(evals, training)
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, render(res))
    log.info("retention: distill AUROC retention %s", res["retention"]["distill"].get("auroc"))
    return res


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--evaluations", required=True, type=Path, help="the evaluate reports folder (one per model)")
    ap.add_argument("--metrics", type=Path, help="metrics JSON (DVC metrics)")
    ap.add_argument("--report", type=Path, help="markdown report (published by the Prefect flow)")


def _main(args: argparse.Namespace) -> None:
    run(load_params(args.params), args.evaluations, args.metrics, args.report)


def main() -> None:
    stage_main("The teacher / baseline / sft / distill table with retention ratios.", _main, _args)


if __name__ == "__main__":
    main()
