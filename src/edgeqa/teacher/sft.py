"""Stage `teacher_sft`: domain SFT of the local teacher on the `labelled` split (human reference answers).

PEFT LoRA on the language model plus the projector; the Lite0 backbone stays frozen, so its features are
computed once. The verdict, type and location value tokens are up-weighted in the loss. Early stopping on
`val` loss; then temperatures (verdict, type) are fitted on `val`, and, with anomaly evidence on, a logistic
ensemble of the LM's calibrated logit and a patch-kNN anomaly score. The report shows the LM alone beside the
ensemble. `test` is never touched here.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from edgeqa.config import GRID_WORDS, TeacherConfig
from edgeqa.data.manifest import mirror_answer, reference_answer, schema_for
from edgeqa.errors import StageError
from edgeqa.evaluation.metrics import auroc
from edgeqa.io import atomic_dir, atomic_write_text, write_json
from edgeqa.progress import Progress
from edgeqa.report import md_table
from edgeqa_runtime.schema import Answer, AnswerSchema

log = logging.getLogger("edgeqa.teacher_sft")


def describe_remote(cfg: TeacherConfig, defect_types: Sequence[str] | None, manifest: Path, out: Path,
                    metrics: Path | None = None, report: Path | None = None,
                    live_dir: Path | None = None) -> dict[str, object]:
    """Backends hf and openai are zero-shot: no SFT. The teacher folder is then a descriptor (teacher.json with
    the backend's settings, never a key), so label, its cache and the fingerprint work as for the local one."""
    schema = schema_for(defect_types, pd.read_parquet(manifest))
    settings = (cfg.hf if cfg.backend == "hf" else cfg.openai).model_dump()
    if cfg.backend == "hf" and not (Path(settings["path"]) / "config.json").is_file():
        raise StageError(f"teacher.hf.path {settings['path']!r} is not a Hugging Face model folder (no config.json)")
    desc = {"backend": cfg.backend, "types": list(schema.types), "locations": list(schema.locations),
            "settings": settings, "max_new_tokens": settings["max_new_tokens"]}
    with atomic_dir(out) as tmp:
        (tmp / "teacher.json").write_text(json.dumps(desc, indent=2, sort_keys=True) + "\n")
    res: dict[str, object] = {"backend": cfg.backend, "trained": False, "train_images": 0}
    if live_dir:  # the stage's declared DVCLive outputs exist, empty of curves: nothing was trained
        (live_dir / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
        write_json(live_dir / "metrics.json", res)
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, f"# teacher_sft\n\nBackend `{cfg.backend}` is zero-shot: no fine-tuning. The "
                          f"teacher folder describes it ({', '.join(sorted(settings))}).\n")
    return res


def align_projector(proj: Any, tokens_of: Any, answers: Sequence[Answer], schema: AnswerSchema, steps: int,
                    lr: float, batch_size: int, rng: np.random.Generator, vision: Sequence[Any] = (),
                    lr_vision: float = 0.0) -> list[dict[str, float]]:
    """"Align before you talk" (LLaVA's stage 1, with labels instead of captions): train the projector (and the
    tuned vision blocks, `vision`), with throw-away linear heads on the mean and the max of its output tokens,
    to predict the verdict, the defect type and the location of the labelled images, before the LM is adapted.
    The LM then starts from image embeddings in which those answers are linearly readable. The max matters on
    real data: a small defect lights one of the 16 tokens and the mean dilutes it (magnetic-tile val, vision
    tuned from block 8, 400 steps: head AUROC 0.62 reading the mean, 0.92 reading the max).
    `tokens_of(index array)` gives the image tokens of those training rows. Returns the loss curve (every 10 steps)."""
    import torch

    from edgeqa.vlm.heads import AnswerHeads

    heads = AnswerHeads(proj.config.lm_hidden, schema)  # they read the mean and the max over the image tokens
    heads.to(next(proj.parameters()).device)
    y = heads.targets(answers)
    groups = [{"params": list(proj.parameters()) + list(heads.parameters()), "lr": lr}]
    if vision:
        groups.append({"params": list(vision), "lr": lr_vision})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    curve, order = [], np.zeros(0, np.int64)
    proj.train()
    for step in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(answers))])
        idx, order = order[:batch_size], order[batch_size:]
        ti = torch.from_numpy(idx)
        loss = heads.loss(proj(tokens_of(idx)), {k: v[ti] for k, v in y.items()})
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 10 == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": loss.item()})
            log.info("align: step %d/%d, aux loss %.4f", step + 1, steps, loss.item())
    return curve


def fit_ensemble(lm_z: np.ndarray, anomaly_z: np.ndarray | None, y: np.ndarray,
                 head_z: np.ndarray | None = None) -> dict[str, float]:
    """The verdict ensemble, fitted on val: the convex mix of the standardised parts (the LM, the anomaly kNN
    when given, the vision head when given) that ranks val best, then a Platt scaling of that score for
    P(defective). The mixes are a grid on the simplex: steps of 0.05 for two parts (21 mixes), 0.1 for three
    (66); ties go to the more even mix. Few ranking parameters and two for calibration: a logistic regression
    on the parts themselves, on ~50 val images, ranked below its better part (it fits log loss, and a few
    confident LM mistakes dominate that)."""
    import itertools

    from sklearn.linear_model import LogisticRegression

    parts = {"w_lm": lm_z, "w_anomaly": anomaly_z, "w_head": head_z}
    names = [k for k, v in parts.items() if v is not None]
    x = np.stack([np.asarray(parts[k], np.float64) for k in names], 1)
    n = 20 // max(1, len(names) - 1)
    mixes = [np.array(c, np.float64) / n for c in itertools.product(range(n + 1), repeat=len(names)) if sum(c) == n]
    scores = [auroc(y, x @ w) or 0.0 for w in mixes]
    even = np.full(len(names), 1 / len(names))
    best = max(range(len(mixes)), key=lambda i: (round(scores[i], 9), -float(((mixes[i] - even) ** 2).sum())))
    w = mixes[best]
    s = x @ w
    lr = LogisticRegression(C=1.0).fit(s[:, None], y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return {"w_lm": 0.0, "w_anomaly": 0.0} | {k: a * float(wk) for k, wk in zip(names, w)} | {"bias": b}


EVIDENCE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0)  # 256: the map decides


def fit_evidence_weight(lm: np.ndarray, ev: np.ndarray, truth: np.ndarray, what: str = "location"
                        ) -> tuple[float, dict[str, float]]:
    """The weight w of a second opinion `ev` in a closed-field choice argmax(lm + w * ev), fitted on val: the w
    of `EVIDENCE_WEIGHTS` with the best accuracy on the defective val images whose answer is known (ties go to
    the smaller w: the LM alone unless the evidence pays). Returns w and the val accuracies of the LM alone,
    the evidence alone and the chosen mix."""
    if len(truth) == 0:
        raise StageError(f"fitting the {what} weight on val: no defective val image with a known {what}")
    acc = [float(((lm + w * ev).argmax(1) == truth).mean()) for w in EVIDENCE_WEIGHTS]
    best = max(range(len(acc)), key=lambda i: (round(acc[i], 9), -i))
    return EVIDENCE_WEIGHTS[best], {"lm": acc[0], "anomaly": float((ev.argmax(1) == truth).mean()),
                                    "ensemble": acc[best]}


def defect_patch_bank(patches: np.ndarray, frame: pd.DataFrame, types: Sequence[str]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The labelled defect patches (those a mask touches) of `frame`'s defective images with a mask and a known
    type, and each one's type index: what type evidence compares an image's most anomalous patches with."""
    from edgeqa.teacher.local import mask_cells

    side = int(round(patches.shape[1] ** 0.5))
    feats, of = [], []
    for i, r in enumerate(frame.itertuples()):
        if r.label != "defective" or not isinstance(r.mask_path, str) or r.defect_type not in types:
            continue
        cells = mask_cells(r.mask_path, side)
        if cells.any():
            feats.append(patches[i][cells])
            of += [types.index(r.defect_type)] * int(cells.sum())
    if not feats:
        return np.zeros((0, patches.shape[-1]), np.float32), np.zeros(0, np.int64)
    return np.ascontiguousarray(np.concatenate(feats), np.float32), np.asarray(of, np.int64)


class TeacherVision:
    """The teacher's view of its images: Lite0 (ImageNet weights) up to a cache point computed once, then the
    blocks above it on every use. With `tune_from` set, blocks tune_from..15 and the head are trained with the
    LM (the defect signal lives in mid-level features that ImageNet's last layers discard); the rest stays
    frozen. Batch norm keeps its ImageNet statistics (eval mode): batches of 8 cannot estimate them."""

    def __init__(self, backbone: Any, tune_from: int | None, token_blocks: Sequence[int], size: int, grid: int,
                 device: Any = "cpu"):
        from edgeqa.vlm.vision import check_blocks

        check_blocks(token_blocks)
        self.backbone, self.tune_from, self.size, self.grid = backbone, tune_from, size, grid
        self.token_blocks, self.device = list(token_blocks), device
        backbone.to(device)
        self.want = sorted(set(token_blocks) | {10})
        self.cache_at = min([*self.want, *([tune_from] if tune_from is not None else [])])
        backbone.eval()
        for name, q in backbone.named_parameters():
            q.requires_grad_(tune_from is not None and self.tuned(name))

    def tuned(self, name: str) -> bool:
        """Whether a backbone parameter or buffer (state_dict name) is one the teacher trains."""
        if self.tune_from is None:
            return False
        if name.startswith("_blocks."):
            return int(name.split(".")[1]) >= self.tune_from
        return name.split(".")[0] in ("_conv_head", "_bn1")

    def parameters(self) -> list[Any]:
        return [q for q in self.backbone.parameters() if q.requires_grad]

    def state(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.backbone.state_dict().items() if self.tuned(k)}

    def cache(self, paths: Sequence[str], flip: bool = False, batch: int = 32) -> Any:
        """The frozen trunk's output (up to the cache point) for image files, optionally mirrored."""
        import torch

        from edgeqa.vlm.vision import lite0_trunk, to_tensor

        out = []
        with torch.inference_mode():
            for i in range(0, len(paths), batch):
                x = to_tensor(list(paths[i:i + batch]), self.size).to(self.device)
                out.append(lite0_trunk(self.backbone, torch.flip(x, dims=[3]) if flip else x, self.cache_at))
        return torch.cat(out).clone()

    def tokens(self, h: Any) -> tuple[Any, Any]:
        """(image tokens, patch features) from cached trunk outputs; differentiable through the tuned blocks."""
        from edgeqa.vlm.vision import lite0_upper, patch_features, pool_tokens

        mids, final = lite0_upper(self.backbone, h, self.cache_at, self.want)
        by = dict(zip(self.want, mids))
        return pool_tokens(final, [by[b] for b in self.token_blocks], self.grid), patch_features(by[10])

    def features(self, h: Any, batch: int = 32) -> dict[str, np.ndarray]:
        """`tokens` and `patches` for many cached rows, without gradients (as edgeqa.vlm.vision.image_features)."""
        import torch

        toks, pats = [], []
        with torch.inference_mode():
            for i in range(0, len(h), batch):
                t, p = self.tokens(h[i:i + batch])
                toks.append(t.cpu().numpy())
                pats.append(p.cpu().numpy())
        return {"tokens": np.concatenate(toks).astype(np.float32),
                "patches": np.concatenate(pats).astype(np.float32)}


def run(cfg: TeacherConfig, defect_types: Sequence[str] | None, base_lm_dir: Path, manifest: Path, out: Path,
        metrics: Path | None = None, report: Path | None = None, live_dir: Path | None = None) -> dict[str, object]:
    """Fine-tune the local teacher (`teacher` params) on the labelled split of `manifest`; for the hf and openai
    backends, write their descriptor folder instead."""
    if cfg.backend != "local":
        return describe_remote(cfg, defect_types, manifest, out, metrics, report, live_dir)
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeqa.distributed import resolve
    from edgeqa.teacher.local import (
        DRAFT_ORDER,
        DRAFTS_FILE,
        VISION_FILE,
        TeacherMeta,
        anomaly_maps,
        cell_evidence,
        location_evidence,
        type_evidence,
    )
    from edgeqa.vlm.model import Layout, Projector, ProjectorConfig, VisionLM, fit_temperature
    from edgeqa.vlm.vision import load_lite0

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    dev = resolve(cfg.device, "teacher.device")
    rng = np.random.default_rng(cfg.seed)
    df = pd.read_parquet(manifest)
    train, val = df[df.split == "labelled"].reset_index(drop=True), df[df.split == "val"].reset_index(drop=True)
    if len(train) == 0 or len(val) == 0:
        raise StageError(f"teacher_sft: {manifest} needs labelled and val images (got {len(train)} and {len(val)})")
    has_masks = bool(df["mask_path"].notna().any())
    schema = AnswerSchema.for_dataset(defect_types, has_masks)
    backbone = load_lite0()
    vision = TeacherVision(backbone, cfg.vision_tune_from, cfg.token_blocks, cfg.image_size, cfg.grid, dev)
    a_tr = [reference_answer(r) for _, r in train.iterrows()]
    a_va = [reference_answer(r) for _, r in val.iterrows()]
    h_tr, h_va = vision.cache(list(train.path)), vision.cache(list(val.path))
    if cfg.augment_flip:  # the mirrored labelled images, their location words swapped
        h_tr = torch.cat([h_tr, vision.cache(list(train.path), flip=True)])
        a_tr += [mirror_answer(a) for a in a_tr]
    ftr = vision.features(h_tr)
    fva = vision.features(h_va)
    head = head_t_va = head_v_va = None
    member_v_va: list[np.ndarray] = []
    head_curve: list[dict[str, float]] = []
    if cfg.vision_head_steps:  # trained first, from ImageNet's block-7 output (the LM never sees it)
        from edgeqa.teacher.vision_head import START, HeadEnsemble, head_scores, train_heads, trunk_output

        paths_tr = list(train.path)
        h7_tr = torch.cat([trunk_output(backbone, paths_tr, cfg.image_size, START, dev),
                           trunk_output(backbone, paths_tr, cfg.image_size, START, dev, flip=True)])
        h7_va = trunk_output(backbone, list(val.path), cfg.image_size, START, dev)
        defective = np.tile((train.label == "defective").to_numpy(), 2)
        type_idx = np.tile(np.array([list(schema.types).index(t) if lab == "defective" and t in schema.types
                                     else -1 for lab, t in zip(train.label, train.defect_type)]), 2)
        # on a forked RNG: the heads seed themselves, and the LM's start below is the same whatever the head config
        with torch.random.fork_rng(devices=[]):
            head = HeadEnsemble.from_backbone(backbone, len(schema.types), cfg.vision_head_grid,
                                              cfg.vision_head_hidden, cfg.vision_head_members).to(dev)
            head_curve = train_heads(head, h7_tr, defective, type_idx, cfg.vision_head_steps, cfg.vision_head_lr,
                                     cfg.vision_head_lr_vision, 16, cfg.seed)
        head.to("cpu")
        head_v_va, head_t_va = head_scores(head, h7_va.cpu())
        member_v_va = [head_scores(m, h7_va.cpu())[0] for m in head.members()]  # each alone, for the report
        del h7_tr, h7_va
    t_feat = time.perf_counter() - t0
    tuned = cfg.vision_tune_from is not None

    tok = AutoTokenizer.from_pretrained(base_lm_dir)
    lm: Any = AutoModelForCausalLM.from_pretrained(base_lm_dir)
    lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.lora_targets,
                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    emb_rms = float(lm.get_input_embeddings().weight.detach().pow(2).mean(-1).sqrt().mean()) \
        if cfg.projector_norm else 0.0  # the text embeddings' RMS, the image tokens' target scale
    proj = Projector(ProjectorConfig(in_dim=ftr["tokens"].shape[-1], n_tokens=cfg.grid * cfg.grid,
                                     lm_hidden=lm.config.hidden_size, hidden=cfg.projector_hidden, out_rms=emb_rms))
    proj.fit_standardiser(ftr["tokens"])
    trained: list[Any] = [lm, proj, backbone]  # on `teacher.device` while training, saved from the CPU
    for m in trained:
        m.to(dev)
    model = VisionLM(lm, tok, proj, Layout.build(tok, schema, instruction_first=cfg.instruction_first))
    x_tr, x_va = torch.from_numpy(ftr["tokens"]).to(dev), torch.from_numpy(fva["tokens"]).to(dev)

    def train_tokens(idx: np.ndarray) -> Any:  # with gradients through the tuned blocks
        return vision.tokens(h_tr[torch.from_numpy(np.asarray(idx))])[0] if tuned else x_tr[idx]

    def val_tokens() -> Any:
        return torch.from_numpy(vision.features(h_va)["tokens"]).to(dev) if tuned else x_va

    align_curve = (align_projector(proj, train_tokens, a_tr, schema, cfg.align_steps, cfg.lr_align,
                                   cfg.batch_size, rng, vision.parameters(), cfg.lr_vision)
                   if cfg.align_steps else [])
    groups = [{"params": [q for q in lm.parameters() if q.requires_grad], "lr": cfg.lr_lora},
              {"params": list(proj.parameters()), "lr": cfg.lr_projector}]
    if tuned:
        groups.append({"params": vision.parameters(), "lr": cfg.lr_vision})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    y_va = (val.label == "defective").to_numpy().astype(int)

    def val_loss() -> float:
        lm.eval()
        proj.eval()
        x_va = val_tokens()
        with torch.no_grad():
            tot = sum(float(model.loss(x_va[i:i + cfg.batch_size], a_va[i:i + cfg.batch_size], cfg.key_token_weight))
                      * len(a_va[i:i + cfg.batch_size]) for i in range(0, len(a_va), cfg.batch_size))
        return tot / len(a_va)

    initial_val_loss = val_loss()
    live = None
    if live_dir is not None:
        from dvclive import Live

        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    best, best_state, bad, history = float("inf"), None, 0, []
    per_epoch = -(-len(a_tr) // cfg.batch_size)
    prog = Progress(log, "teacher_sft", cfg.epochs * per_epoch, "steps")  # the total if no early stop
    for epoch in range(cfg.epochs):
        lm.train()
        proj.train()
        order = rng.permutation(len(a_tr))
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = model.loss(train_tokens(idx), [a_tr[j] for j in idx], cfg.key_token_weight)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            prog.update(epoch * per_epoch + len(losses), epoch=epoch + 1, loss=float(np.mean(losses[-20:])))
        vl = val_loss()
        d, _ = model.verdict_logits(val_tokens())
        auc = auroc(y_va, d.cpu().numpy())
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": vl, "val_auroc_lm": auc})
        log.info("epoch %d: train %.4f val %.4f val AUROC (LM) %s", epoch + 1, np.mean(losses), vl, auc)
        if live is not None:
            live.log_metric("train_loss", float(np.mean(losses)))
            live.log_metric("val_loss", vl)
            if auc is not None:
                live.log_metric("val_auroc_lm", auc)
            live.next_step()
        if vl < best - 1e-4:
            best, bad = vl, 0
            best_state = (copy.deepcopy({k: v for k, v in lm.state_dict().items() if "lora_" in k}),
                          copy.deepcopy(proj.state_dict()), vision.state())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if live is not None:
        live.end()
    assert best_state is not None
    lm.load_state_dict(best_state[0], strict=False)
    proj.load_state_dict(best_state[1])
    lm.eval()
    proj.eval()
    if tuned:  # the kept epoch's vision, and the features it gives (the anomaly bank and the calibration use them)
        backbone.load_state_dict(best_state[2], strict=False)
        ftr, fva = vision.features(h_tr[:len(train)]), vision.features(h_va)
        x_va = torch.from_numpy(fva["tokens"]).to(dev)

    # calibration on val: verdict and type temperatures
    d_va = model.verdict_logits(x_va)[0].cpu().numpy()
    t_verdict = fit_temperature(d_va, y_va, binary=True)
    t_type, type_acc, type_lp_dv, tgt = 1.0, None, None, None
    dv = np.flatnonzero((val.label == "defective").to_numpy())
    if schema.types and len(dv):
        lp = type_lp_dv = model.type_logprobs(x_va[torch.from_numpy(dv).to(dev)]).cpu().numpy()
        tgt = np.array([schema.types.index(t) for t in val.defect_type.iloc[dv]])
        t_type = fit_temperature(lp, tgt, binary=False)
        type_acc = float((lp.argmax(1) == tgt).mean())
    # anomaly evidence and the ensemble, fitted on val
    ens, a_mean, a_std, auc_anom, auc_ens = {"w_lm": 1.0, "w_anomaly": 0.0, "bias": 0.0}, 0.0, 1.0, None, None
    bank, a_va_scores, maps_va = None, None, None
    lm_mean, lm_std, h_mean, h_std = 0.0, 1.0, 0.0, 1.0
    if len(set(y_va.tolist())) < 2 and (cfg.anomaly or head is not None):
        raise StageError(f"teacher_sft: the verdict ensemble is fitted on val, which needs good and defective "
                         f"images; {manifest} has {len(val)} val images, all "
                         f"{'defective' if y_va.all() else 'good'}")
    if cfg.anomaly:
        good = np.flatnonzero((train.label == "good").to_numpy())
        bank = ftr["patches"][good].reshape(-1, ftr["patches"].shape[-1])
        maps_va = anomaly_maps(fva["patches"], bank)  # scaled on val: train patches are in the bank
        a_va_scores = maps_va.max(axis=1)
        a_mean, a_std = float(a_va_scores.mean()), float(a_va_scores.std() + 1e-6)
        auc_anom = auroc(y_va, a_va_scores)
    if head_v_va is not None:
        h_mean, h_std = float(head_v_va.mean()), float(head_v_va.std() + 1e-6)
    if cfg.anomaly or head_v_va is not None:
        # All standardised on val: the calibrated LM logit is bimodal and wide (about -2..16 on demo val), the
        # kNN distance heavy-tailed.
        lm_mean, lm_std = float((d_va / t_verdict).mean()), float((d_va / t_verdict).std() + 1e-6)
        ens = fit_ensemble((d_va / t_verdict - lm_mean) / lm_std,
                           None if a_va_scores is None else (a_va_scores - a_mean) / a_std, y_va,
                           None if head_v_va is None else (head_v_va - h_mean) / h_std)
    meta = TeacherMeta(base_lm_dir=str(base_lm_dir), image_size=cfg.image_size, grid=cfg.grid,
                       types=list(schema.types), locations=list(schema.locations), verdict_temperature=t_verdict,
                       type_temperature=t_type, anomaly=cfg.anomaly, ensemble=ens, anomaly_mean=a_mean,
                       anomaly_std=a_std, token_blocks=list(cfg.token_blocks), vision_tuned_from=cfg.vision_tune_from,
                       lm_mean=lm_mean, lm_std=lm_std, head_mean=h_mean, head_std=h_std,
                       vision_head=None if head is None else head.config(), draft_tokens=cfg.draft_tokens,
                       instruction_first=cfg.instruction_first)
    # second opinions from the anomaly map for the type and the location, each weighted on val beside the LM's
    type_acc_mix: dict[str, float] | None = None
    type_acc_head: dict[str, float] | None = None
    loc_acc: dict[str, float] | None = None
    type_bank = type_of = None
    picks_dv: list[str | None] = []
    if type_lp_dv is not None and tgt is not None:
        zt = z_dv = type_lp_dv / t_type
        if cfg.anomaly_type and maps_va is not None and bank is not None:
            type_bank, type_of = defect_patch_bank(ftr["patches"][:len(train)], train, list(schema.types))
            if len(type_bank):
                ev = type_evidence(maps_va[dv], fva["patches"][dv], type_bank, type_of, len(schema.types),
                                   meta.type_top_patches, meta.type_neighbours)
                meta.type_anomaly_weight, type_acc_mix = fit_evidence_weight(z_dv, ev, tgt, "type")
                zt = z_dv + meta.type_anomaly_weight * ev
        if head_t_va is not None:  # the head's opinion on top of the LM's (and the kNN's) choice
            meta.type_head_weight, type_acc_head = fit_evidence_weight(zt, head_t_va[dv], tgt, "type")
            zt = zt + meta.type_head_weight * head_t_va[dv]
        picks_dv = [schema.types[j] for j in zt.argmax(1).tolist()]
    dl = np.flatnonzero(((val.label == "defective") & val.location.notna()).to_numpy())
    if cfg.anomaly_location and schema.locations and maps_va is not None and len(dl):
        # the location context holds the chosen type, as in predict
        pick_of = dict(zip(dv.tolist(), picks_dv))
        xl = x_va[torch.from_numpy(dl).to(dev)]
        with torch.no_grad():
            picks = [pick_of.get(i) for i in dl.tolist()] if schema.types else [None] * len(dl)
            lp = model.location_logprobs(proj(xl), picks).cpu().numpy()[:, :len(schema.locations)]
        truth = np.array([schema.locations.index(w) for w in val.location.iloc[dl]])
        meta.location_anomaly_weight, loc_acc = fit_evidence_weight(
            lp, location_evidence(cell_evidence(maps_va[dl]), a_std), truth, "location")
    if cfg.anomaly or head_v_va is not None:
        from edgeqa.teacher.local import ensemble_p

        auc_ens = auroc(y_va, ensemble_p(meta, d_va, a_va_scores, head_v_va))
    for m in trained:
        m.to("cpu")
    with atomic_dir(out) as tmp:
        proj.save_pretrained(tmp / "projector")
        lm.save_pretrained(tmp / "adapter")
        if bank is not None:
            banks = {"bank": np.ascontiguousarray(bank)}
            if type_bank is not None and type_of is not None and meta.type_anomaly_weight:
                banks |= {"type_bank": type_bank, "type_of": type_of}
            save_file(banks, str(tmp / "anomaly_bank.safetensors"))
        if tuned:
            save_torch({k: v.contiguous() for k, v in vision.state().items()}, str(tmp / VISION_FILE))
        if head is not None:
            from edgeqa.teacher.vision_head import HEAD_FILE, save_head

            save_head(head, tmp / HEAD_FILE)
        if cfg.draft_tokens:  # the answers trained on, as the LM saw them: the reason's drafts continue them
            seqs = [model.layout.answer_ids(a, tok)[0] for a in a_tr]
            (tmp / DRAFTS_FILE).write_text(json.dumps({"n": DRAFT_ORDER, "sequences": seqs}) + "\n")
        (tmp / "teacher.json").write_text(json.dumps(meta.__dict__, indent=2) + "\n")
    dt = time.perf_counter() - t0
    lm_params = sum(q.numel() for q in lm.parameters())
    member_auc = [auroc(y_va, v) for v in member_v_va]
    res: dict[str, object] = {
        "train_images": len(train), "val_images": len(val), "epochs_run": len(history),
        "initial_val_loss": initial_val_loss, "best_val_loss": best, "val_auroc_lm": auroc(y_va, d_va),
        "val_auroc_anomaly": auc_anom,
        "val_auroc_vision_head": None if head_v_va is None else auroc(y_va, head_v_va),
        "val_auroc_vision_head_members": member_auc,
        "vision_head_steps": cfg.vision_head_steps, "vision_head_members": cfg.vision_head_members if head else 0,
        "vision_head_final_loss": head_curve[-1]["loss"] if head_curve else None,
        "val_type_accuracy_vision_head": None if head_t_va is None or tgt is None
        else float((head_t_va[dv].argmax(1) == tgt).mean()),
        "type_head_weight": meta.type_head_weight,
        "val_type_accuracy_with_head": type_acc_head["ensemble"] if type_acc_head else None,
        "val_auroc_ensemble": auc_ens, "val_type_accuracy_lm": type_acc, "verdict_temperature": t_verdict,
        "type_temperature": t_type, "seconds": round(dt, 2), "feature_seconds": round(t_feat, 2),
        "parameters": int(lm_params + sum(q.numel() for q in proj.parameters())
                          + sum(q.numel() for q in backbone.parameters())),
        "locations_known": bool(schema.locations == GRID_WORDS),
        "align_steps": cfg.align_steps, "align_final_loss": align_curve[-1]["loss"] if align_curve else None,
        "type_anomaly_weight": meta.type_anomaly_weight,
        "val_type_accuracy_anomaly": type_acc_mix["anomaly"] if type_acc_mix else None,
        "val_type_accuracy_ensemble": type_acc_mix["ensemble"] if type_acc_mix else type_acc,
        "location_anomaly_weight": meta.location_anomaly_weight,
        "val_location_accuracy_lm": loc_acc["lm"] if loc_acc else None,
        "val_location_accuracy_anomaly": loc_acc["anomaly"] if loc_acc else None,
        "val_location_accuracy_ensemble": loc_acc["ensemble"] if loc_acc else None,
    }
    if metrics:
        write_json(metrics, res)
    if report:
        rows: list[list[Any]] = [[h["epoch"], h["train_loss"], h["val_loss"], h["val_auroc_lm"]] for h in history]
        auc_rows: list[list[Any]] = [["LM alone (calibrated)", res["val_auroc_lm"]],
                                     ["patch-kNN anomaly alone", auc_anom],
                                     [f"supervised vision head alone (mean of {len(member_v_va)})"
                                      if len(member_v_va) > 1 else "supervised vision head alone",
                                      res["val_auroc_vision_head"]],
                                     *([[f"vision head {i + 1} of {len(member_auc)}", a]
                                        for i, a in enumerate(member_auc)] if len(member_auc) > 1 else []),
                                     ["ensemble (fitted on val)", auc_ens]]
        atomic_write_text(report, "# teacher_sft\n\n"
                          f"SFT of the local teacher (Lite0 -> projector -> SmolLM2-135M + LoRA r={cfg.lora_r}) on "
                          f"{len(train)} labelled images, early stopping on {len(val)} val images, "
                          f"{res['seconds']} s.\n\n"
                          + md_table(["epoch", "train loss", "val loss", "val AUROC (LM)"], rows)
                          + "\n\nVerdict on val (the LM's own share beside the ensemble):\n\n"
                          + md_table(["P(defective) from", "val AUROC"], auc_rows)
                          + f"\n\nTemperatures fitted on val: verdict {t_verdict:.3g}, type {t_type:.3g}. "
                          f"Type accuracy on defective val images (LM): "
                          f"{type_acc if type_acc is None else round(type_acc, 3)}.\n"
                          + ("" if type_acc_mix is None else
                             f"\nType from the defect-patch kNN alone {type_acc_mix['anomaly']:.3f}, chosen mix "
                             f"{type_acc_mix['ensemble']:.3f} (weight {meta.type_anomaly_weight:g}).\n")
                          + ("" if type_acc_head is None else
                             f"\nType from the vision head alone {type_acc_head['anomaly']:.3f}; with it "
                             f"{type_acc_head['ensemble']:.3f} (weight {meta.type_head_weight:g}).\n")
                          + ("" if loc_acc is None else
                             f"\nLocation on the {len(dl)} defective val images with a mask: LM alone "
                             f"{loc_acc['lm']:.3f}, anomaly map alone {loc_acc['anomaly']:.3f}, chosen mix "
                             f"{loc_acc['ensemble']:.3f} (anomaly-map weight {meta.location_anomaly_weight:g}).\n"))
    log.info("teacher_sft: %s", res)
    return res
