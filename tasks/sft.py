"""Stages `sft` and `baseline`: supervised fine-tuning of a fresh student.

`sft` trains on the `labelled` split (human reference answers) plus the teacher's answers on the
`unlabelled` pool (per-source weights and a teacher-confidence filter from params). `baseline` is the same code
with the teacher's weight set to 0: the small model trained on human labels alone, with the same step budget;
it is the seed's "small model" row. Optionally (`sft.paste`), synthetic defects pasted onto real good training
images enlarge rare defect types. Early stopping on `val`; temperatures fitted on `val`; `test` is never read.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from tasks.common import StageError, atomic_write_text, md_table, stage_main, write_json
from tasks.config import Params, load_params
from tasks.student_train import student_stage_args

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


def run(p: Params, role: Role, base_lm_dir: Path, teacher_dir: Path, manifest: Path, labels_dir: Path,
        features_dir: Path, out: Path, metrics: Path | None = None, report: Path | None = None,
        live_dir: Path | None = None) -> dict[str, Any]:
    import torch

    from tasks.answer import reference_answer
    from tasks.student import count_parameters
    from tasks.student_features import load as load_features
    from tasks.student_train import (
        Example,
        apply_lora,
        calibrate,
        check_ratio,
        frozen_features,
        new_student,
        read_labels,
        save_student,
        schema_for,
        teacher_answer,
        teacher_parameters,
        teacher_reason_ids,
        train,
    )
    from tasks.vlm import Layout, VisionLM

    if role not in ("sft", "baseline"):
        raise StageError(f"role {role!r}: allowed sft, baseline")
    cfg, scfg = p.student, p.sft
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    df = pd.read_parquet(manifest)
    lab = df[df.split == "labelled"].reset_index(drop=True)
    unl = df[df.split == "unlabelled"].reset_index(drop=True)
    val = df[df.split == "val"].reset_index(drop=True)
    if lab.empty or val.empty:
        raise StageError(f"{role}: {manifest} needs labelled and val images (got {len(lab)} and {len(val)})")
    labels = read_labels(labels_dir)
    schema = schema_for(p, df)
    texts, extra = vocab_sources(df, labels, cfg.vocab_soft_min_prob)
    model, tok, base_tok = new_student(p, schema, base_lm_dir, texts, extra)
    w_h = scfg.weights["human"]
    w_t = 0.0 if role == "baseline" else scfg.weights["teacher"]

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
            if max(rec["p_defective"], 1 - rec["p_defective"]) < scfg.min_teacher_confidence:
                skipped["low_confidence"] += 1
                continue
            rid = teacher_reason_ids(rec)
            ex.append(Example(len(shas), teacher_answer(rec), "teacher", w_t,
                              tok.map_ids(rid) if rid is not None else None, rec))
            shas.append(r.sha256)
    pasted: list[np.ndarray] = []
    paste_info: dict[str, Any] | None = None
    if scfg.paste.enabled:
        from tasks.paste import paste_examples

        pasted, answers, paste_info = paste_examples(p, lab, schema)
        ex += [Example(len(shas) + i, a, "paste", w_h) for i, a in enumerate(answers)]
    if not any(e.weight > 0 for e in ex):
        raise StageError(f"{role}: no training example has a weight above 0 (sft.weights {scfg.weights})")
    ex = [e for e in ex if e.weight > 0]
    t1 = time.perf_counter()
    feats, feats_flip = load_features(p, features_dir, shas)
    if pasted:
        feats = torch.cat([feats, frozen_features(model, pasted)])
        if feats_flip is not None:
            feats_flip = torch.cat([feats_flip, frozen_features(model, [a[:, ::-1].copy() for a in pasted])])
    t_feat = time.perf_counter() - t1

    vlm = VisionLM(model.decoder, tok, model.projector, Layout.build(tok, schema))
    longest = len(vlm.layout.pre) + cfg.grid ** 2 + len(vlm.layout.post) + max(
        len(vlm.layout.answer_ids(e.answer, tok, e.reason_ids)[0]) for e in ex + val_ex)
    if longest > cfg.decoder.max_positions:
        raise StageError(f"the longest training sequence has {longest} tokens but student.decoder.max_positions is "
                         f"{cfg.decoder.max_positions}; raise it (or shorten teacher.max_reason_tokens)")
    peft_model = None
    if scfg.finetune == "lora":
        peft_model = apply_lora(p, model)
    else:
        model.set_trainable(vision=scfg.lr_vision > 0)
    y_val = (val.label == "defective").to_numpy().astype(int)
    tr = train(p, model, vlm, feats, ex, val_ex, y_val, scfg.steps, scfg.lr, scfg.lr_vision, live_dir,
               feats_flip=feats_flip)
    if peft_model is not None:
        model = peft_model.merge_and_unload()
        vlm.lm, vlm.projector = model.decoder, model.projector
    cal = calibrate(model, vlm, feats, val_ex, val, schema)
    n_student = count_parameters(model)
    n_teacher = teacher_parameters(p, teacher_dir, base_lm_dir)
    ratio = check_ratio(p, n_student, n_teacher)
    save_student(model, base_tok, out)
    dt = time.perf_counter() - t0
    counts = pd.Series([e.source for e in ex]).value_counts().to_dict()
    res: dict[str, Any] = {
        "role": role, "train_examples": len(ex), "examples_by_source": counts, "teacher_labels_skipped": skipped,
        "val_images": len(val), "steps_run": tr.steps_run, "stopped_early": tr.stopped_early,
        "best_val_loss": tr.best_val_loss, **cal, "parameters": n_student, "teacher_parameters": n_teacher,
        "parameter_ratio": ratio, "vocab_size": tok.vocab_size, "decoder": cfg.decoder.arch,
        "finetune": scfg.finetune, "paste": paste_info, "seconds": round(dt, 2),
        "feature_seconds": round(t_feat, 2)}
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, render(role, res, tr.history))
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


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--role", choices=["sft", "baseline"], default="sft")
    student_stage_args(ap)


def _main(args: argparse.Namespace) -> None:
    run(load_params(args.params), args.role, args.base_lm, args.teacher, args.manifest, args.labels, args.features,
        args.out, args.metrics, args.report, args.live)


def main() -> None:
    stage_main("SFT of the student (or, with --role baseline, the human-labels-only baseline).", _main, _args)


if __name__ == "__main__":
    main()
