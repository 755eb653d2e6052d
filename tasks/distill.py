"""Stage `distill`: knowledge distillation from the teacher into the `sft` student.

Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE on the target tokens (tasks/kd.py).

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

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common import StageError, atomic_write_text, md_table, stage_main, write_json
from tasks.config import Params, load_params
from tasks.student_train import student_stage_args

log = logging.getLogger("edgeqa.distill")


def kd_targets(layout: Any, tok: Any, answer: Any, rec: dict[str, Any], own_sequence: bool, top_k: int
               ) -> tuple[list[tuple[int, list[int], list[float]]], dict[str, int], list[float]]:
    """KD targets of one example as (answer-token index, student ids, teacher log-probs); how many of each kind
    (verdict, type, location, reason); and the teacher mass dropped by the vocabulary at each reason position."""
    from tasks.kd import option_targets

    schema = layout.schema
    opts = schema.options()
    out: list[tuple[int, list[int], list[float]]] = []
    kinds = {"verdict": 1, "type": 0, "location": 0, "reason": 0}
    j = len(layout.field_ids["verdict"])
    p = min(max(float(rec["p_defective"]), 1e-6), 1 - 1e-6)
    out.append((j, *option_targets({"good": 1 - p, "defective": p}, opts["verdict"], layout.options["verdict"])))
    if answer.verdict == "defective":
        j += len(layout.option("verdict", "defective")) + len(layout.field_ids["type"])
        tp = rec.get("type_probs") or {}
        if schema.types and tp:
            out.append((j, *option_targets(tp, schema.types, layout.options["type"][:len(schema.types)])))
            kinds["type"] = 1
        teacher_type = max(tp, key=lambda k: tp[k]) if tp else None
        j += len(layout.option("type", answer.defect_type)) + len(layout.field_ids["location"])
        lp = rec.get("location_probs") or {}
        if schema.locations and lp and (not schema.types or answer.defect_type == teacher_type):
            out.append((j, *option_targets(lp, opts["location"], layout.options["location"])))
            kinds["location"] = 1
    dropped: list[float] = []
    if own_sequence:
        from tasks.kd import restrict

        j0 = _reason_start(layout, answer)
        steps = [s for s in rec.get("soft_targets", []) if s["position"].startswith("reason:")]
        for k, st in enumerate(steps):
            r = restrict(st["ids"][:top_k], st["logprobs"][:top_k], tok.to_student)
            dropped.append(r.dropped)
            if r.ids:
                out.append((j0 + k, r.ids, r.logprobs))
                kinds["reason"] += 1
    return out, kinds, dropped


def _reason_start(layout: Any, a: Any) -> int:
    return (len(layout.field_ids["verdict"]) + len(layout.option("verdict", a.verdict))
            + len(layout.field_ids["type"]) + len(layout.option("type", a.defect_type))
            + len(layout.field_ids["location"]) + len(layout.option("location", a.location))
            + len(layout.field_ids["reason"]))


def make_kd(temperature: float) -> Any:
    """The KD term for a batch: targets placed at logit column prefix + j - 1 (the column predicting token j)."""
    import torch

    from tasks.kd import kd_loss

    def kd(logits: torch.Tensor, prefix: int, batch: Sequence[Any]) -> torch.Tensor:
        b, length, _ = logits.shape
        k = max((len(ids) for e in batch for _, ids, _ in e.kd), default=1)
        ids = torch.zeros(b, length, k, dtype=torch.long)
        lps = torch.full((b, length, k), float("-inf"))
        mask = torch.zeros(b, length, dtype=torch.bool)
        for i, e in enumerate(batch):
            for j, tid, tlp in e.kd:
                c = prefix + j - 1
                ids[i, c, :len(tid)] = torch.tensor(tid)
                lps[i, c, :len(tlp)] = torch.tensor(tlp)
                mask[i, c] = True
        return kd_loss(logits, mask, ids, lps, temperature, torch.tensor([e.weight for e in batch]))

    return kd


def run(p: Params, sft_dir: Path, base_lm_dir: Path, teacher_dir: Path, manifest: Path, labels_dir: Path,
        features_dir: Path, out: Path, metrics: Path | None = None, report: Path | None = None,
        live_dir: Path | None = None) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from tasks.answer import reference_answer
    from tasks.student import TOKENIZER_DIR, PrunedTokenizer, StudentModel, count_parameters, is_student_folder
    from tasks.student_features import load as load_features
    from tasks.student_train import (
        Example,
        apply_lora,
        calibrate,
        check_ratio,
        read_labels,
        save_student,
        teacher_answer,
        teacher_parameters,
        teacher_reason_ids,
        train,
    )
    from tasks.vlm import Layout, VisionLM

    cfg, dcfg = p.student, p.distill
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if not is_student_folder(sft_dir):
        raise StageError(f"{sft_dir} is not a student folder: run the sft stage first")
    model = StudentModel.from_pretrained(sft_dir)
    base_tok = AutoTokenizer.from_pretrained(sft_dir / TOKENIZER_DIR)
    tok = PrunedTokenizer(base_tok, model.config.vocab_map)
    schema = model.config.schema()
    layout = Layout.build(tok, schema)
    df = pd.read_parquet(manifest)
    lab = df[df.split == "labelled"].reset_index(drop=True)
    unl = df[df.split == "unlabelled"].reset_index(drop=True)
    val = df[df.split == "val"].reset_index(drop=True)
    labels = read_labels(labels_dir)
    w_h, w_t = p.sft.weights["human"], p.sft.weights["teacher"]
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
            e.kd, kk, _ = kd_targets(layout, tok, a, rec, own_sequence=False, top_k=dcfg.top_k)
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
        e.kd, kk, d = kd_targets(layout, tok, a, rec, own_sequence=rid is not None, top_k=dcfg.top_k)
        kinds = {k: kinds[k] + kk[k] for k in kinds}
        dropped += d
        ex.append(e)
        shas.append(r.sha256)
    ex = [e for e in ex if e.weight > 0]
    if not ex:
        raise StageError(f"distill: no training example has a weight above 0 (sft.weights {p.sft.weights})")
    val_ex = [Example(len(shas) + i, reference_answer(r), "human", 1.0) for i, (_, r) in enumerate(val.iterrows())]
    shas += list(val.sha256)
    t1 = time.perf_counter()
    feats, feats_flip = load_features(p, features_dir, shas)
    t_feat = time.perf_counter() - t1
    vlm = VisionLM(model.decoder, tok, model.projector, layout)
    peft_model = apply_lora(p, model) if dcfg.finetune == "lora" else None
    if peft_model is None:
        model.set_trainable(vision=dcfg.lr_vision > 0)
    y_val = (val.label == "defective").to_numpy().astype(int)
    tr = train(p, model, vlm, feats, ex, val_ex, y_val, dcfg.steps, dcfg.lr, dcfg.lr_vision, live_dir,
               kd=make_kd(dcfg.temperature), alpha=dcfg.alpha, feats_flip=feats_flip)
    if peft_model is not None:
        model = peft_model.merge_and_unload()
        vlm.lm, vlm.projector = model.decoder, model.projector
    cal = calibrate(model, vlm, feats, val_ex, val, schema)
    n_student = count_parameters(model)
    n_teacher = teacher_parameters(p, teacher_dir, base_lm_dir)
    ratio = check_ratio(p, n_student, n_teacher)
    save_student(model, base_tok, out)
    res: dict[str, Any] = {
        "train_examples": len(ex), "examples_by_source": pd.Series([e.source for e in ex]).value_counts().to_dict(),
        "examples_without_label": missing, "kd_positions": kinds,
        "alpha": dcfg.alpha, "temperature": dcfg.temperature, "top_k": dcfg.top_k,
        "dropped_mass_mean": float(np.mean(dropped)) if dropped else None,
        "dropped_mass_max": float(np.max(dropped)) if dropped else None,
        "dropped_mass_positions": len(dropped),
        "steps_run": tr.steps_run, "stopped_early": tr.stopped_early, "best_val_loss": tr.best_val_loss, **cal,
        "parameters": n_student, "teacher_parameters": n_teacher, "parameter_ratio": ratio,
        "finetune": dcfg.finetune, "seconds": round(time.perf_counter() - t0, 2), "feature_seconds": round(t_feat, 2)}
    if metrics:
        write_json(metrics, res)
    if report:
        rows = [[h["step"], h["train_loss"], h["val_loss"], h["val_auroc"]] for h in tr.history]
        keys = [k for k in res if k not in ("alpha", "temperature", "top_k")]
        atomic_write_text(report, (
            f"# distill\n\nKD from the teacher into the sft student: alpha {dcfg.alpha}, temperature "
            f"{dcfg.temperature}, top-k {dcfg.top_k}. Teacher probability mass outside the student's vocabulary at "
            f"the reason positions: mean {res['dropped_mass_mean']}, max {res['dropped_mass_max']} over "
            f"{len(dropped)} positions.\n\n"
            + md_table(["figure", "value"], [[k, res[k]] for k in keys])
            + "\n\n## Curves\n\n" + md_table(["step", "train loss", "val loss", "val AUROC"], rows) + "\n"))
    log.info("distill: %s", res)
    return res


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--sft", required=True, type=Path, help="the sft student folder to start from")
    student_stage_args(ap)


def _main(args: argparse.Namespace) -> None:
    run(load_params(args.params), args.sft, args.base_lm, args.teacher, args.manifest, args.labels, args.features,
        args.out, args.metrics, args.report, args.live)


def main() -> None:
    stage_main("Distil the teacher into the sft student.", _main, _args)


if __name__ == "__main__":
    main()
