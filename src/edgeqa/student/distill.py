"""Stage `distill`: knowledge distillation from the teacher into the `sft` student.

Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE on the target tokens
(`edgeqa.student.kd.DistillLoss`; the targets come from `edgeqa.student.kd.kd_targets`).

The KL applies at every answer position where the student reads the teacher's own context:
- verdict: the teacher's calibrated P(defective) (its decision, the ensemble where it has one) over the two
  verdict tokens;
- type: the teacher's type distribution, when the answer's verdict is defective (the teacher scored types in
  that same context);
- location: the teacher's location distribution (options sharing a first token pooled), when the answer's type
  is the teacher's own pick;
- reason: the teacher's top-k tokens at each generated position, on the teacher's own answers (the unlabelled
  pool), restricted to the student's pruned vocabulary and renormalised; the mass dropped is reported.
Human answers (the labelled split) keep their CE targets and get the closed-field KL where the context matches.
Starts from the sft model; early stopping on `val`; temperatures refitted on `val`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from edgeqa.config import DistillConfig, StudentConfig
from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text, write_json
from edgeqa.report import md_table

log = logging.getLogger("edgeqa.distill")


@dataclass
class KDExamples:
    examples: list[Any]           # edgeqa.student.train.Example, with their KD targets
    shas: list[str]               # feature rows, in order (examples point into it)
    kinds: dict[str, int]         # KD positions by field
    dropped: list[float]          # teacher mass outside the student's vocabulary, per reason position
    missing: int                  # images with no label record


def kd_examples(layout: Any, tok: Any, lab: pd.DataFrame, unl: pd.DataFrame, labels: dict[str, dict[str, Any]],
                weights: Mapping[Any, float], top_k: int, weights_key: str) -> KDExamples:
    """Training examples with the teacher's soft targets (what `distill` and `prune`'s recovery train on): the
    labelled images with their human answers, and the unlabelled pool with the teacher's parsed answers."""
    from edgeqa.data.manifest import reference_answer
    from edgeqa.student.kd import kd_targets
    from edgeqa.student.train import Example, teacher_answer, teacher_reason_ids

    w_h, w_t = weights["human"], weights["teacher"]
    shas: list[str] = []
    ex: list[Example] = []
    dropped: list[float] = []
    kinds = {"verdict": 0, "type": 0, "location": 0, "reason": 0}
    missing = 0
    for _, r in lab.iterrows():
        rec = labels.get(r.sha256)
        a = reference_answer(r)
        e = Example(len(shas), a, "human", w_h, record=rec)
        if rec is not None:
            e.kd, kk, _ = kd_targets(layout, tok, a, rec, own_sequence=False, top_k=top_k)
            e.kd_flip_safe = kk["verdict"] + kk["type"]  # verdict and type hold for the mirror image
            kinds = {k: kinds[k] + kk[k] for k in kinds}
        else:
            missing += 1
        ex.append(e)
        shas.append(r.sha256)
    for _, r in unl.iterrows():
        rec = labels.get(r.sha256)
        if rec is None or not rec["parse_ok"]:
            missing += rec is None
            continue
        a = teacher_answer(rec)
        rid = teacher_reason_ids(rec)
        e = Example(len(shas), a, "teacher", w_t, tok.map_ids(rid) if rid is not None else None, rec)
        e.kd, kk, d = kd_targets(layout, tok, a, rec, own_sequence=rid is not None, top_k=top_k)
        kinds = {k: kinds[k] + kk[k] for k in kinds}
        dropped += d
        ex.append(e)
        shas.append(r.sha256)
    ex = [e for e in ex if e.weight > 0]
    if not ex:
        raise StageError(f"no training example has a weight above 0 ({weights_key} {weights})")
    return KDExamples(ex, shas, kinds, dropped, missing)


def run(cfg: DistillConfig, student: StudentConfig, sft_dir: Path, base_lm_dir: Path, teacher_dir: Path,
        manifest: Path, labels_dir: Path, features_dir: Path, out: Path, metrics: Path | None = None,
        report: Path | None = None, live_dir: Path | None = None) -> dict[str, Any]:
    """Distil the teacher's labels (`labels_dir`) into the sft student (`sft_dir`) with `cfg`'s loss and budget."""
    import torch

    from edgeqa.data.manifest import reference_answer
    from edgeqa.student.features import load as load_features
    from edgeqa.student.kd import DistillLoss
    from edgeqa.student.train import Example, fit, load_student, read_labels, read_splits
    from edgeqa.vlm.model import VisionLM

    t0 = time.perf_counter()
    torch.set_num_threads(student.threads)
    st = load_student(sft_dir, "distill")
    model, base_tok, tok, layout, schema = st.model, st.base_tok, st.tok, st.layout, st.schema
    sp = read_splits(manifest, "distill")
    lab, unl, val = sp.labelled, sp.unlabelled, sp.val
    kx = kd_examples(layout, tok, lab, unl, read_labels(labels_dir), cfg.weights, cfg.top_k, "distill.weights")
    ex, shas, kinds, dropped, missing = kx.examples, kx.shas, kx.kinds, kx.dropped, kx.missing
    val_ex = [Example(len(shas) + i, reference_answer(r), "human", 1.0) for i, (_, r) in enumerate(val.iterrows())]
    shas += list(val.sha256)
    t1 = time.perf_counter()
    feats, feats_flip = load_features(student, features_dir, shas)
    t_feat = time.perf_counter() - t1
    vlm = VisionLM(model.decoder, tok, model.projector, layout)
    loss = DistillLoss(alpha=cfg.alpha, temperature=cfg.temperature)
    f = fit(student, cfg, model, vlm, feats, ex, val_ex, val, schema, base_tok, teacher_dir, base_lm_dir, out,
            live_dir, loss, feats_flip)
    res: dict[str, Any] = {
        "train_examples": len(ex), "examples_by_source": pd.Series([e.source for e in ex]).value_counts().to_dict(),
        "examples_without_label": missing, "kd_positions": kinds,
        "alpha": cfg.alpha, "temperature": cfg.temperature, "top_k": cfg.top_k,
        "dropped_mass_mean": float(np.mean(dropped)) if dropped else None,
        "dropped_mass_max": float(np.max(dropped)) if dropped else None,
        "dropped_mass_positions": len(dropped),
        "steps_run": f.train.steps_run, "stopped_early": f.train.stopped_early,
        "best_val_loss": f.train.best_val_loss, **f.calibration,
        "parameters": f.parameters, "teacher_parameters": f.teacher_parameters, "parameter_ratio": f.parameter_ratio,
        "finetune": cfg.finetune, "seconds": round(time.perf_counter() - t0, 2), "feature_seconds": round(t_feat, 2),
        "placement": f.placement}
    if not f.main:  # another torchrun process: rank 0 writes
        return res
    if metrics:
        write_json(metrics, res)
    if report:
        rows = [[h["step"], h["train_loss"], h["val_loss"], h["val_auroc"]] for h in f.train.history]
        keys = [k for k in res if k not in ("alpha", "temperature", "top_k")]
        atomic_write_text(report, (
            f"# distill\n\nKD from the teacher into the sft student: alpha {cfg.alpha}, temperature "
            f"{cfg.temperature}, top-k {cfg.top_k}. Teacher probability mass outside the student's vocabulary at "
            f"the reason positions: mean {res['dropped_mass_mean']}, max {res['dropped_mass_max']} over "
            f"{len(dropped)} positions.\n\n"
            + md_table(["figure", "value"], [[k, res[k]] for k in keys])
            + "\n\n## Curves\n\n" + md_table(["step", "train loss", "val loss", "val AUROC"], rows) + "\n"))
    log.info("distill: %s", res)
    return res
