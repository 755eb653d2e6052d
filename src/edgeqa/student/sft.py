"""Stages `sft` and `baseline`: supervised fine-tuning of a fresh student.

`sft` trains on the `labelled` split (human reference answers) plus the teacher's answers on the
`unlabelled` pool (per-source weights and a teacher-confidence filter from params). `baseline` is the same code
with the teacher's weight set to 0: the small model trained on human labels alone, with the same step budget;
it is the seed's "small model" row. Optionally (`sft.paste`), synthetic defects pasted onto real good training
images enlarge rare defect types. Early stopping on `val`; temperatures fitted on `val`; `test` is never read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from edgeqa.config import MaskFactsConfig, SFTConfig, StudentConfig
from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text, write_json
from edgeqa.report import md_table

log = logging.getLogger("edgeqa.sft")
Role = Literal["sft", "baseline"]


def vocab_sources(manifest: pd.DataFrame, labels: dict[str, dict[str, Any]], min_prob: float
                  ) -> tuple[list[str], list[int]]:
    """Texts and teacher ids the pruned vocabulary must cover: the human reference reasons of the training
    splits (labelled, val; never test or the unlabelled pool), the teacher's reasons and generated tokens, and
    its soft-target tokens at least `min_prob` likely."""
    texts = [str(r) for r in manifest[manifest.split.isin(["labelled", "val"])].reason]
    ids: set[int] = set()
    for rec in labels.values():
        texts.append(rec["reason"])
        for st in rec.get("soft_targets", []):
            ids.add(int(st["ids"][0]))
            ids |= {int(i) for i, lp in zip(st["ids"], st["logprobs"]) if np.exp(lp) >= min_prob}
    return texts, sorted(ids)


def run(cfg: SFTConfig, student: StudentConfig, defect_types: Sequence[str] | None, mask_facts: MaskFactsConfig,
        role: Role, base_lm_dir: Path, teacher_dir: Path, manifest: Path, labels_dir: Path, features_dir: Path,
        out: Path, metrics: Path | None = None, report: Path | None = None, live_dir: Path | None = None
        ) -> dict[str, Any]:
    """Train a fresh student (`student` architecture, `cfg` budget) on the labelled split, plus the teacher's
    answers on the unlabelled pool for role sft; `mask_facts` words the pasted defects' reasons."""
    import torch

    from edgeqa.data.manifest import reference_answer, schema_for
    from edgeqa.student.features import load as load_features
    from edgeqa.student.train import (
        Example,
        fit,
        frozen_features,
        new_student,
        read_labels,
        read_splits,
        teacher_answer,
        teacher_reason_ids,
    )
    from edgeqa.vlm.model import Layout, VisionLM

    if role not in ("sft", "baseline"):
        raise StageError(f"role {role!r}: allowed sft, baseline")
    t0 = time.perf_counter()
    torch.set_num_threads(student.threads)
    sp = read_splits(manifest, role)
    df, lab, unl, val = sp.all, sp.labelled, sp.unlabelled, sp.val
    labels = read_labels(labels_dir)
    schema = schema_for(defect_types, df)
    texts, extra = vocab_sources(df, labels, student.vocab_soft_min_prob)
    model, tok, base_tok = new_student(student, schema, base_lm_dir, texts, extra)
    w_h = cfg.weights["human"]
    w_t = 0.0 if role == "baseline" else cfg.weights["teacher"]

    shas = list(lab.sha256) + list(val.sha256)
    ex: list[Example] = [Example(i, reference_answer(r), "human", w_h) for i, (_, r) in enumerate(lab.iterrows())]
    val_ex = [Example(len(lab) + i, reference_answer(r), "human", 1.0) for i, (_, r) in enumerate(val.iterrows())]
    skipped = {"no_label": 0, "parse_failed": 0, "low_confidence": 0}
    if w_t > 0:
        for _, r in unl.iterrows():
            rec = labels.get(r.sha256)
            if rec is None:
                skipped["no_label"] += 1
                continue
            if not rec["parse_ok"]:
                skipped["parse_failed"] += 1
                continue
            if max(rec["p_defective"], 1 - rec["p_defective"]) < cfg.min_teacher_confidence:
                skipped["low_confidence"] += 1
                continue
            rid = teacher_reason_ids(rec)
            ex.append(Example(len(shas), teacher_answer(rec), "teacher", w_t,
                              tok.map_ids(rid) if rid is not None else None, rec))
            shas.append(r.sha256)
    pasted: list[np.ndarray] = []
    paste_info: dict[str, Any] | None = None
    if cfg.paste.enabled:
        from edgeqa.data.paste import paste_examples

        pasted, answers, paste_info = paste_examples(cfg.paste, student.image_size, mask_facts, lab, schema)
        ex += [Example(len(shas) + i, a, "paste", w_h) for i, a in enumerate(answers)]
    if not any(e.weight > 0 for e in ex):
        raise StageError(f"{role}: no training example has a weight above 0 (sft.weights {cfg.weights})")
    ex = [e for e in ex if e.weight > 0]
    t1 = time.perf_counter()
    feats, feats_flip = load_features(student, features_dir, shas)
    if pasted:
        feats = torch.cat([feats, frozen_features(model, pasted)])
        if feats_flip is not None:
            feats_flip = torch.cat([feats_flip, frozen_features(model, [a[:, ::-1].copy() for a in pasted])])
    t_feat = time.perf_counter() - t1

    vlm = VisionLM(model.decoder, tok, model.projector, Layout.build(tok, schema))
    longest = len(vlm.layout.pre) + student.grid ** 2 + len(vlm.layout.post) + max(
        len(vlm.layout.answer_ids(e.answer, tok, e.reason_ids)[0]) for e in ex + val_ex)
    if longest > student.decoder.max_positions:
        raise StageError(f"the longest training sequence has {longest} tokens but student.decoder.max_positions is "
                         f"{student.decoder.max_positions}; raise it (or shorten teacher.max_reason_tokens)")
    f = fit(student, cfg, model, vlm, feats, ex, val_ex, val, schema, base_tok, teacher_dir, base_lm_dir, out,
            live_dir, feats_flip=feats_flip)
    dt = time.perf_counter() - t0
    counts = pd.Series([e.source for e in ex]).value_counts().to_dict()
    res: dict[str, Any] = {
        "role": role, "train_examples": len(ex), "examples_by_source": counts, "teacher_labels_skipped": skipped,
        "val_images": len(val), "steps_run": f.train.steps_run, "stopped_early": f.train.stopped_early,
        "best_val_loss": f.train.best_val_loss, **f.calibration, "parameters": f.parameters,
        "teacher_parameters": f.teacher_parameters, "parameter_ratio": f.parameter_ratio,
        "vocab_size": tok.vocab_size, "decoder": student.decoder.arch, "finetune": cfg.finetune,
        "paste": paste_info, "seconds": round(dt, 2), "feature_seconds": round(t_feat, 2), "placement": f.placement}
    if not f.main:  # another torchrun process: rank 0 writes
        return res
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, render(role, res, f.train.history))
    log.info("%s: %s", role, res)
    return res


def render(role: str, res: dict[str, Any], history: list[dict[str, Any]]) -> str:
    what = ("human labels only (the teacher's weight is 0): the small model alone" if role == "baseline"
            else "human labels plus the teacher's labels on the unlabelled pool")
    rows = [[h["step"], h["train_loss"], h["val_loss"], h["val_auroc"]] for h in history]
    keys = ["train_examples", "examples_by_source", "teacher_labels_skipped", "steps_run", "stopped_early",
            "best_val_loss", "val_auroc", "val_type_accuracy", "verdict_temperature", "type_temperature",
            "parameters", "teacher_parameters", "parameter_ratio", "vocab_size", "decoder", "finetune", "paste",
            "seconds", "feature_seconds"]
    return (f"# {role}\n\nThe student trained on {what}.\n\n"
            + md_table(["figure", "value"], [[k, res[k]] for k in keys])
            + "\n\n## Curves (val every `student.eval_every` steps)\n\n"
            + md_table(["step", "train loss", "val loss", "val AUROC"], rows) + "\n")
