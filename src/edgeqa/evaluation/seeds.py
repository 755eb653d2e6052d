"""The seed's claim over several seeds: `baseline`, `sft` and `distill` retrained with each `student.seed`,
each scored on the held-out split by the `evaluate` code, then mean +- sd per row and a paired bootstrap of
(row - baseline) that resamples images and seeds together.

One run cannot decide the claim: the student's AUROC moved by 0.1 between two machines for the same seed.
This experiment is not part of `make run` (`make seeds`, `edgeqa seeds`). It reads what the pipeline built
(manifest, teacher labels, student features, the base LM) and never writes into the pipeline's outputs: each
(seed, row) gets `reports/seeds/runs/seed-<k>/<row>/` with the evaluate stage's `metrics.json` and
`predictions.jsonl`; the trained students live in a temporary folder and are deleted. A (seed, row) whose
`metrics.json` carries the same input key (params sections, seed, input hashes from dvc.lock, the training
code's hashes) is reused, so an interrupted run resumes. `test` is only scored, never used to choose anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from edgeqa.config import Params, load_params
from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text, write_json
from edgeqa.report import fmt, md_table

log = logging.getLogger("edgeqa.seeds")
ROWS = ("baseline", "sft", "distill")
BASELINE = "baseline"
SD_TARGET = 0.02  # the teacher issue's target: sd of AUROC across seeds on magnetic tiles
CODE = ("src/edgeqa/student", "src/edgeqa/evaluation/evaluate.py", "src/edgeqa/evaluation/metrics.py",
        "src/edgeqa/vlm", "src/edgeqa/answerer.py")


def bootstrap_seeds_delta(truth: np.ndarray, a: np.ndarray, b: np.ndarray,
                          stat: Callable[[np.ndarray, np.ndarray], float | None], n: int, seed: int
                          ) -> dict[str, float | int | None]:
    """Mean over seeds of stat(b) - stat(a), with a percentile bootstrap 95 % interval that resamples images
    and seeds together. `a` and `b` are (seeds, images) arrays of scores or answers for the same images; seed
    k of `a` is paired with seed k of `b` (same initial weights, same batch order). A resample where `stat` is
    undefined (one class only) is skipped and not counted."""
    a, b, truth = np.asarray(a), np.asarray(b), np.asarray(truth)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != len(truth):
        raise ValueError(f"bootstrap_seeds_delta: shapes {a.shape} and {b.shape} for {len(truth)} images")
    seeds, images = a.shape

    def delta(idx: np.ndarray, ks: Sequence[int]) -> float | None:
        vals = []
        for k in ks:
            sa, sb = stat(truth[idx], a[k, idx]), stat(truth[idx], b[k, idx])
            if sa is None or sb is None:
                return None
            vals.append(sb - sa)
        return float(np.mean(vals))

    point = delta(np.arange(images), range(seeds))
    if point is None:
        return {"mean_a": None, "mean_b": None, "delta": None, "ci_low": None, "ci_high": None, "resamples": 0}
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        idx, ks = rng.integers(0, images, size=(images,)), rng.integers(0, seeds, size=(seeds,)).tolist()
        if (d := delta(idx, ks)) is not None:
            deltas.append(d)
    lo, hi = np.percentile(deltas, [2.5, 97.5]) if deltas else (np.nan, np.nan)
    return {"mean_a": float(np.mean([stat(truth, a[k]) for k in range(seeds)])),
            "mean_b": float(np.mean([stat(truth, b[k]) for k in range(seeds)])),
            "delta": point, "ci_low": float(lo), "ci_high": float(hi), "resamples": len(deltas)}


def accuracy(truth: np.ndarray, pred: np.ndarray) -> float | None:
    """Share of `pred` equal to `truth` (None for no items)."""
    return float(np.mean(np.asarray(truth) == np.asarray(pred))) if len(truth) else None


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from edgeqa.evaluation.metrics import auroc

    return auroc(y.astype(int), s.astype(float))


def _sha_tree(root: Path, rel: str) -> str:
    p = root / rel
    h = hashlib.sha256()
    for f in sorted(p.rglob("*.py") if p.is_dir() else [p]):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def input_key(root: Path, params: Params, seed: int, row: str) -> str:
    """What a (seed, row) result depends on: the params sections the student stages read, the seed, the hashes
    dvc.lock records for the `row` stage's dependencies, and the training and scoring code."""
    lock_file = root / "dvc.lock"
    if not lock_file.is_file():
        raise StageError(f"{lock_file} is missing: run the pipeline (make run) before the seeds experiment")
    stages = yaml.safe_load(lock_file.read_text()).get("stages", {})
    stage = "sft" if row == "distill" else row  # distill's inputs are sft's plus the sft model we train here
    if stage not in stages:
        raise StageError(f"{lock_file}: no stage {stage!r}; run the pipeline (make run) first")
    deps = sorted((d["path"], d.get("md5", "")) for d in stages[stage].get("deps", [])
                  if not d["path"].startswith("src/") and not d["path"].startswith("tasks/"))
    sections = {k: params.model_dump(mode="json")[k] for k in ("student", "sft", "distill", "evaluate")}
    blob = json.dumps({"row": row, "seed": seed, "deps": deps, "params": sections,
                       "code": {c: _sha_tree(root, c) for c in CODE}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _done(folder: Path, key: str) -> bool:
    f = folder / "metrics.json"
    if not (f.is_file() and (folder / "predictions.jsonl").is_file()):
        return False
    try:
        return json.loads(f.read_text()).get("seeds_key") == key
    except json.JSONDecodeError:
        return False


def train_and_score(root: Path, params: Params, seeds: Sequence[int], out: Path) -> None:
    """Train and score every (seed, row) not already done with the same inputs."""
    import torch

    from edgeqa.evaluation import evaluate
    from edgeqa.student import distill, sft
    from edgeqa.student.sft import Role

    p = params.paths
    base_lm, teacher, manifest = root / p.base_lm_dir, root / p.models_dir / "teacher", \
        root / p.ingest_dir / "manifest.parquet"
    labels, features = root / p.labels_dir, root / p.student_features_dir
    for need in (base_lm, teacher, manifest, labels, features):
        if not need.exists():
            raise StageError(f"{need} is missing: run the pipeline (make run) before the seeds experiment")
    torch.set_num_threads(params.student.threads)
    for seed in seeds:
        student = params.student.model_copy(update={"seed": int(seed)})
        keys = {row: input_key(root, params, seed, row) for row in ROWS}
        folders = {row: out / "runs" / f"seed-{seed}" / row for row in ROWS}
        if all(_done(folders[r], keys[r]) for r in ROWS):
            log.info("seed %d: every row already scored with these inputs; reused", seed)
            continue
        with tempfile.TemporaryDirectory(prefix=f"edgeqa-seed{seed}-") as tmp:
            models = Path(tmp)
            for row in ROWS:
                if _done(folders[row], keys[row]) and not (row == "sft" and not _done(folders["distill"],
                                                                                       keys["distill"])):
                    log.info("seed %d %s: already scored with these inputs; reused", seed, row)
                    continue
                t0 = time.perf_counter()
                log.info("seed %d: training %s", seed, row)
                if row == "distill":
                    tr = distill.run(params.distill, student, models / "sft", base_lm, teacher, manifest, labels,
                                     features, models / row)
                else:
                    role: Role = "baseline" if row == "baseline" else "sft"
                    tr = sft.run(params.sft, student, params.ingest.defect_types, params.ingest.mask_facts, role,
                                 base_lm, teacher, manifest, labels, features, models / row)
                train_s = time.perf_counter() - t0
                tmp_eval = models / f"{row}-eval"
                res = evaluate.run(params.evaluate, list(params.ingest.mask_facts.size_classes), row, models / row,
                                   manifest, tmp_eval)
                res.update(seeds_key=keys[row], seed=int(seed), train_seconds=round(train_s, 1),
                           train_steps=tr.get("steps_run"), val_auroc=tr.get("val_auroc"),
                           val_type_accuracy=tr.get("val_type_accuracy"))
                write_json(tmp_eval / "metrics.json", res)
                if folders[row].exists():
                    shutil.rmtree(folders[row])
                folders[row].parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(tmp_eval, folders[row].with_name(row + ".tmp"), dirs_exist_ok=True)
                folders[row].with_name(row + ".tmp").rename(folders[row])  # published whole, or not at all
                log.info("seed %d %s: test AUROC %s, type accuracy %s (%.0f s)", seed, row, fmt(res["auroc"], 3),
                         fmt(res["type_accuracy"], 3), time.perf_counter() - t0)


def _read_preds(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines() if x.strip()]


def summarise(root: Path, params: Params, seeds: Sequence[int], out: Path, bootstrap: int) -> dict[str, Any]:
    """Mean +- sd per row over seeds, and each row against `baseline` with the pooled paired bootstrap."""
    from edgeqa.data.manifest import schema_for
    from edgeqa.evaluation.evaluate import _argmax

    df = pd.read_parquet(root / params.paths.ingest_dir / "manifest.parquet")
    rows = df[df.split == params.evaluate.split].reset_index(drop=True)
    types = tuple(schema_for(params.ingest.defect_types, df).types)
    y = (rows.label == "defective").to_numpy().astype(int)
    d = np.flatnonzero(y == 1)
    truth_t = rows.defect_type.iloc[d].astype(str).to_numpy()
    scores: dict[str, np.ndarray] = {}
    tpred: dict[str, np.ndarray] = {}
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for row in ROWS:
        s_rows, t_rows = [], []
        for seed in seeds:
            folder = out / "runs" / f"seed-{seed}" / row
            recs = _read_preds(folder)
            if [r["sha256"] for r in recs] != list(rows.sha256):
                raise StageError(f"{folder / 'predictions.jsonl'}: its images are not the manifest's "
                                 f"{params.evaluate.split!r} split; rerun `edgeqa seeds --fresh`")
            m = json.loads((folder / "metrics.json").read_text())
            per_seed.setdefault(row, []).append(
                {k: m.get(k) for k in ("seed", "auroc", "type_accuracy", "miss_rate", "overkill_rate",
                                       "location_accuracy", "reason_similarity", "train_seconds", "train_steps",
                                       "val_auroc", "val_type_accuracy")})
            s_rows.append([r["p_defective"] for r in recs])
            t_rows.append([_argmax(recs[i].get("type_probs"), types) or str(recs[i]["type"]) for i in d])
        scores[row], tpred[row] = np.array(s_rows, dtype=float), np.array(t_rows, dtype=object)

    def ms(vals: list[Any]) -> dict[str, float | None]:
        v = [x for x in vals if x is not None]
        return {"mean": float(np.mean(v)) if v else None, "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                "min": float(np.min(v)) if v else None, "max": float(np.max(v)) if v else None}

    summary = {row: {k: ms([s[k] for s in per_seed[row]])
                     for k in ("auroc", "type_accuracy", "miss_rate", "overkill_rate", "location_accuracy",
                               "reason_similarity", "val_auroc", "val_type_accuracy")} for row in ROWS}
    has_types = len(d) > 0 and rows.defect_type.iloc[d].notna().all()
    versus = {}
    for row in ROWS[1:]:
        versus[row] = {
            "auroc": bootstrap_seeds_delta(y, scores[BASELINE], scores[row], _auroc, bootstrap, params.evaluate.seed),
            "type_accuracy": (bootstrap_seeds_delta(truth_t, tpred[BASELINE], tpred[row], accuracy, bootstrap,
                                                    params.evaluate.seed) if has_types else None)}
    teacher_m = root / params.paths.reports_dir / "evaluate" / "teacher" / "metrics.json"
    teacher = json.loads(teacher_m.read_text()) if teacher_m.is_file() else {}
    claim_a, claim_t = versus["distill"]["auroc"], versus["distill"]["type_accuracy"]
    return {"split": params.evaluate.split, "images": len(rows), "defective": int(y.sum()), "seeds": list(seeds),
            "bootstrap": bootstrap, "per_seed": per_seed, "summary": summary, "versus_baseline": versus,
            "teacher": {k: teacher.get(k) for k in ("auroc", "type_accuracy", "miss_rate", "overkill_rate")},
            "auroc_sd_target": SD_TARGET,
            "claim_holds": bool(claim_a is not None and (claim_a["ci_low"] or 0) > 0
                                and claim_t is not None and (claim_t["ci_low"] or 0) > 0)}


def render(res: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return fmt(v, 3)

    def msd(x: dict[str, Any]) -> str:
        return f"{f(x['mean'])} ± {f(x['sd'])}"

    s = res["summary"]
    head = ["row", "AUROC mean ± sd", "AUROC min–max", "type acc. mean ± sd", "miss rate", "overkill rate",
            "location acc.", "MiniLM", "val AUROC", "val type acc."]
    table = [[r, msd(s[r]["auroc"]), f"{f(s[r]['auroc']['min'])}–{f(s[r]['auroc']['max'])}",
              msd(s[r]["type_accuracy"]), msd(s[r]["miss_rate"]), msd(s[r]["overkill_rate"]),
              msd(s[r]["location_accuracy"]), msd(s[r]["reason_similarity"]), msd(s[r]["val_auroc"]),
              msd(s[r]["val_type_accuracy"])] for r in ROWS]
    t = res["teacher"]
    if t.get("auroc") is not None:
        table.append(["teacher (the pipeline's, one run)", f(t["auroc"]), "", f(t["type_accuracy"]), f(t["miss_rate"]),
                      f(t["overkill_rate"]), "", "", "", ""])
    vs = []
    for r, v in res["versus_baseline"].items():
        for metric in ("auroc", "type_accuracy"):
            b = v[metric]
            if b is None:
                vs.append([r, metric, "n/a", "", ""])
                continue
            vs.append([r, metric, f(b["delta"]), f"[{f(b['ci_low'])}, {f(b['ci_high'])}]", str(b["resamples"])])
    seed_rows = [[r, str(x["seed"]), f(x["val_auroc"]), f(x["auroc"]), f(x["type_accuracy"]), f(x["miss_rate"]),
                  f(x["overkill_rate"]), str(x["train_steps"]), f(x["train_seconds"])]
                 for r in ROWS for x in res["per_seed"][r]]
    sd_b = s[BASELINE]["auroc"]["sd"]
    claim = ("**holds**: distill beats baseline on AUROC and type accuracy, both intervals above zero"
             if res["claim_holds"] else
             "**does not hold** here: the pooled interval of distill - baseline does not lie above zero on both "
             "AUROC and type accuracy")
    return (f"# The seed's claim over {len(res['seeds'])} seeds\n\n"
            f"Split `{res['split']}` ({res['images']} images, {res['defective']} defective); seeds "
            f"{res['seeds']}. Each row retrained per seed (`student.seed`) on the pipeline's own teacher labels "
            "and features, scored by the evaluate stage's code.\n\n"
            + md_table(head, table)
            + f"\n\nAUROC sd across seeds of `baseline`: {f(sd_b)} (target ≤ {res['auroc_sd_target']}: "
              f"{'met' if sd_b is not None and sd_b <= res['auroc_sd_target'] else 'missed'}).\n\n"
              f"## Against `baseline` (mean over seeds of row − baseline; 95 % interval of a paired bootstrap "
              f"resampling images and seeds together, {res['bootstrap']} resamples)\n\n"
            + md_table(["row", "metric", "Δ", "95 % interval", "resamples used"], vs)
            + f"\n\nThe seed's claim (distill − baseline > 0 on AUROC and type accuracy): {claim}.\n\n"
              "## Per seed\n\n"
            + md_table(["row", "seed", "val AUROC", "AUROC", "type acc.", "miss", "overkill", "steps run", "train s"],
                       seed_rows) + "\n")


def main(root: Path, seeds: Sequence[int], bootstrap: int = 2000, fresh: bool = False,
         params_file: Path | None = None, out: Path | None = None) -> dict[str, Any]:
    """Run the experiment for the project at `root`; write `out` (default reports/seeds)/report.{json,md}.
    `params_file` (default the project's params.yaml) may differ from what the pipeline ran in the student
    sections only: a lever tried over seeds on the pipeline's own teacher labels and features."""
    if len(set(seeds)) < 2:
        raise StageError(f"seeds: give at least two different seeds (got {list(seeds)}); sd needs two")
    root = Path(root).resolve()
    params_file = Path(params_file).resolve() if params_file else root / "params.yaml"
    params = load_params(params_file)
    out = Path(out).resolve() if out else root / params.paths.reports_dir / "seeds"
    if fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    with contextlib.chdir(root):  # manifest paths are relative to the project, as in the stages
        train_and_score(root, params, seeds, out)
        res = summarise(root, params, seeds, out, bootstrap)
    write_json(out / "report.json", res)
    atomic_write_text(out / "report.md", render(res))
    log.info("seeds: report in %s", out / "report.md")
    return res
