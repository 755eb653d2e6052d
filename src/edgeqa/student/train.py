"""What the student stages (`baseline`, `sft`, `distill`) share: training examples, the training loop with
early stopping and DVCLive curves, and `fit`, the common tail (fine-tune choice, train, LoRA merge, calibration
on `val`, the parameter-ratio check, save).

Budgets are in optimizer steps, so `baseline` and `sft` get the same budget whatever their data sizes.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from edgeqa.config import StudentConfig, StudentStageConfig
from edgeqa.data.manifest import mirror_answer
from edgeqa.distributed import Runtime, seed_shard, setup
from edgeqa.errors import StageError
from edgeqa.io import atomic_dir
from edgeqa.progress import Progress
from edgeqa.student.kd import DistillLoss
from edgeqa.vlm.heads import AnswerHeads
from edgeqa_runtime.schema import Answer, AnswerSchema

log = logging.getLogger("edgeqa.student")


@dataclass
class Example:
    feat: int                      # row of the cached frozen-trunk features
    answer: Answer
    source: str                    # human | teacher | paste
    weight: float
    reason_ids: list[int] | None = None   # teacher-generated reason, as student ids
    record: dict[str, Any] | None = None  # the teacher's label record (soft targets), when there is one
    kd: list[tuple[int, list[int], list[float]]] = field(default_factory=list)  # (answer index, ids, logprobs)
    kd_flip_safe: int = 0          # leading kd entries that hold for the mirrored image (verdict, type)
    flip: bool = False             # this copy reads the mirrored image's features (augmentation)


def flipped_copy(e: Example) -> Example:
    return replace(e, answer=mirror_answer(e.answer), flip=True, kd=e.kd[:e.kd_flip_safe])


def read_labels(labels_dir: Path) -> dict[str, dict[str, Any]]:
    f = Path(labels_dir) / "labels.jsonl"
    if not f.is_file():
        raise StageError(f"{f} is missing: run the label stage first")
    out = {}
    for n, line in enumerate(f.read_text().splitlines(), 1):
        try:
            r = json.loads(line)
            out[r["sha256"]] = r
        except (json.JSONDecodeError, KeyError) as exc:
            raise StageError(f"{f}: line {n} is not a label record ({exc})") from None
    return out


@dataclass
class Splits:
    """The manifest's rows a student stage reads: all of them, and the labelled / unlabelled / val splits."""
    all: pd.DataFrame
    labelled: pd.DataFrame
    unlabelled: pd.DataFrame
    val: pd.DataFrame


def read_splits(manifest: Path, stage: str) -> Splits:
    """The manifest's splits; `stage` names the caller in the error when labelled or val is empty."""
    df = pd.read_parquet(manifest)
    lab, unl, val = (df[df.split == s].reset_index(drop=True) for s in ("labelled", "unlabelled", "val"))
    if lab.empty or val.empty:
        raise StageError(f"{stage}: {manifest} needs labelled and val images (got {len(lab)} and {len(val)})")
    return Splits(df, lab, unl, val)


@dataclass
class LoadedStudent:
    """A saved student loaded for further training: the model, the teacher tokenizer saved beside it, the
    pruned-vocabulary tokenizer over it, and the prompt layout."""
    model: Any
    base_tok: Any
    tok: Any
    layout: Any

    @property
    def schema(self) -> AnswerSchema:
        return self.model.config.schema()


def load_student(folder: Path, stage: str) -> LoadedStudent:
    """Load the student in `folder`; `stage` names the caller (and the stage to run) when it is not one."""
    from transformers import AutoTokenizer

    from edgeqa.student.model import TOKENIZER_DIR, StudentModel, is_student_folder
    from edgeqa.student.vocab import PrunedTokenizer
    from edgeqa.vlm.model import Layout

    if not is_student_folder(folder):
        raise StageError(f"{stage}: {folder} is not a student folder (no config.json of a student model); "
                         f"run the stage that writes it first (dvc repro)")
    model = StudentModel.from_pretrained(folder)
    base_tok = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    tok = PrunedTokenizer(base_tok, model.config.vocab_map)
    return LoadedStudent(model, base_tok, tok, Layout.build(tok, model.config.schema()))


def teacher_answer(rec: dict[str, Any]) -> Answer:
    return Answer(rec["verdict"], rec["type"], rec["location"], rec["reason"])


def teacher_reason_ids(rec: dict[str, Any]) -> list[int] | None:
    """The teacher's generated reason tokens (teacher ids): greedy decoding, so each step's top-1 soft target."""
    steps = [s for s in rec.get("soft_targets", []) if s["position"].startswith("reason:")]
    if not steps or len(steps) != rec.get("generated_tokens"):
        return None
    return [int(s["ids"][0]) for s in steps]


def teacher_parameters(teacher_dir: Path, base_lm_dir: Path) -> int | None:
    """Parameters in the files the local teacher loads at inference: base LM, LoRA adapter, projector and the
    Lite0 weights (embeddings included, tied ones once). The anomaly bank is data, not counted. None for the
    hf/openai backends (their weights are not here)."""
    from safetensors import safe_open

    meta = json.loads((Path(teacher_dir) / "teacher.json").read_text())
    if meta.get("backend", "local") != "local":
        return None
    files = [Path(base_lm_dir) / "model.safetensors", *sorted((Path(teacher_dir) / "adapter").glob("*.safetensors")),
             *sorted((Path(teacher_dir) / "projector").glob("*.safetensors"))]
    n = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                n += int(np.prod(st.get_slice(k).get_shape()))
    from edgeqa.vlm.vision import load_lite0

    n += sum(q.numel() for q in load_lite0().parameters())
    return n


def new_student(cfg: StudentConfig, schema: AnswerSchema, base_lm_dir: Path, texts: Sequence[str],
                extra_ids: Sequence[int]) -> tuple[Any, Any, Any]:
    """A fresh student: ImageNet trunk, projector, decoder over the pruned vocabulary (embeddings from the
    teacher's by PCA, or random). Returns (model, pruned tokenizer, base tokenizer)."""
    from transformers import AutoTokenizer

    from edgeqa.student.model import StudentModel, StudentModelConfig, decoder_config_dict, lite0_into
    from edgeqa.student.vocab import PrunedTokenizer, build_vocab, teacher_embedding_init
    from edgeqa.vlm.model import IM_END

    torch.manual_seed(cfg.seed)
    base = AutoTokenizer.from_pretrained(base_lm_dir)
    keep = build_vocab(base, texts, extra_ids, schema)
    tok = PrunedTokenizer(base, keep)
    d = cfg.decoder
    eos = tok.convert_tokens_to_ids(IM_END)
    dec = decoder_config_dict(d.arch, tok.vocab_size, d.hidden, d.layers, d.heads, d.intermediate, d.max_positions,
                              pad_id=eos, eos_id=eos)
    sc = StudentModelConfig(vision_blocks=cfg.vision_blocks, frozen_blocks=cfg.frozen_blocks, image_size=cfg.image_size,
                       grid=cfg.grid, projector_hidden=cfg.projector_hidden, decoder=dec, vocab_map=keep,
                       types=list(schema.types), locations=list(schema.locations))
    model = StudentModel(sc)
    lite0_into(model.vision)
    if cfg.embed_init == "teacher_pca":
        with torch.no_grad():
            model.decoder.get_input_embeddings().weight.copy_(
                teacher_embedding_init(base_lm_dir, keep, d.hidden, cfg.seed))
    return model, tok, base


def frozen_features(model: Any, images: Sequence[np.ndarray]) -> torch.Tensor:
    """The frozen trunk's output for in-memory RGB images (uint8 HxWx3), e.g. pasted defects; image files go
    through the student_features stage."""
    from edgeqa.vlm.vision import tensor_from_arrays

    parts = []
    with torch.inference_mode():
        for i in range(0, len(images), 32):
            parts.append(model.frozen_features(tensor_from_arrays(images[i:i + 32], model.config.image_size)))
    return torch.cat(parts)


def apply_lora(cfg: StudentConfig, model: Any) -> Any:
    """PEFT LoRA on the decoder's listed linear layers (and, optionally, the trainable trunk blocks' 1x1 convs);
    the projector stays fully trainable. Returns the PeftModel (merge it with `merge_and_unload`)."""
    from peft import LoraConfig, get_peft_model

    lc = cfg.lora
    targets = "|".join(lc.targets)
    pattern = rf"decoder\..*\.({targets})"
    if lc.vision:
        blocks = "|".join(str(i) for i in range(model.config.frozen_blocks, model.config.vision_blocks))
        pattern = rf"({pattern}|vision\.blocks\.({blocks})\._(expand|project)_conv)"
    try:
        peft_model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, target_modules=pattern,
                                                      lora_dropout=0.0))
    except ValueError as exc:
        raise StageError(f"student.lora.targets {lc.targets} match no layer of the {cfg.decoder.arch} decoder "
                         f"({exc}); llama names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj; gpt2: "
                         "c_attn c_proj c_fc") from None
    for q in model.projector.parameters():
        q.requires_grad_(True)
    return peft_model


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    best_val_loss: float
    steps_run: int
    stopped_early: bool


def batch_loss(model: Any, vlm: Any, feats: torch.Tensor, batch: Sequence[Example], key_weight: float,
               loss: DistillLoss, feats_flip: torch.Tensor | None = None, aux: AnswerHeads | None = None,
               aux_weight: float = 0.0) -> torch.Tensor:
    """The loss of one batch: teacher-forced logits over the answers, then `loss` (CE, plus the KD term where
    alpha > 0), plus `aux_weight` times the answer heads' loss on the image embeddings when `aux` is given.
    Examples marked `flip` read the mirrored image's features."""
    rows = [feats_flip[e.feat] if e.flip and feats_flip is not None else feats[e.feat] for e in batch]
    tokens = model.tokens_from_frozen(torch.stack(rows))
    seqs = [vlm.layout.answer_ids(e.answer, vlm.tok, e.reason_ids) for e in batch]
    weights = [e.weight for e in batch]
    logits, tgt, w, prefix = vlm.answer_logits(tokens, seqs, key_weight, weights)
    out = loss(logits, tgt, w, prefix, [e.kd for e in batch], weights)
    if aux is not None and aux_weight > 0:
        out = out + aux_weight * aux.loss(vlm.projector(tokens), aux.targets([e.answer for e in batch]),
                                          torch.tensor(weights, dtype=torch.float32))
    return out


def train(cfg: StudentConfig, model: Any, vlm: Any, feats: torch.Tensor, train_ex: list[Example],
          val_ex: list[Example], val_y: np.ndarray, steps: int, lr: float, lr_vision: float, live_dir: Path | None,
          loss_fn: DistillLoss | None = None, feats_flip: torch.Tensor | None = None,
          rt: Runtime | None = None) -> TrainResult:
    """AdamW over the trainable parameters for `steps` steps (batches drawn by epoch-wise permutation), val
    evaluation every `eval_every` steps, early stopping on val CE loss with `patience`; the best state is
    restored. Curves go to DVCLive. With `feats_flip`, each human or pasted example is mirrored with
    probability 1/2 (a teacher's answer is not: its reason tokens are tied to its soft targets).

    Each step's batch is cut into shards (`student.micro_batches`, at least one per torchrun process, see
    edgeqa.distributed); a shard's forward draws from a stream seeded by (seed, step, shard). `model`, `feats`
    and `feats_flip` are on `rt.device`."""
    from edgeqa.evaluation.metrics import auroc

    rt = rt or Runtime(torch.device("cpu"))
    loss_fn = loss_fn or DistillLoss()
    ce_only = DistillLoss()
    rng = np.random.default_rng(cfg.seed)
    vision = [q for n, q in model.named_parameters() if q.requires_grad and ".vision." in f".{n}"]
    vis_ids = {id(q) for q in vision}
    # The global generator is seeded here, not only where the model is built: the trunk's drop-connect and the
    # heads below draw from it, and a stage's result must not depend on what ran before it in the process (the
    # seeds experiment runs baseline, sft and distill in one process; distill starts from a loaded model).
    torch.manual_seed(cfg.seed)
    # Train-only answer heads on the image embeddings (student.aux_weight): never part of the saved model.
    aux = (AnswerHeads(vlm.projector.config.lm_hidden, vlm.layout.schema, cfg.aux_fields).to(rt.device)
           if cfg.aux_weight > 0 else None)
    rt.sync_module(model)  # every process starts from rank 0's weights
    if aux is not None:
        rt.sync_module(aux)
    rest = [q for q in model.parameters() if q.requires_grad and id(q) not in vis_ids]
    rest += list(aux.parameters()) if aux is not None else []
    groups = [{"params": rest, "lr": lr}] + ([{"params": vision, "lr": lr_vision}] if vision and lr_vision else [])
    trained = rest + (vision if vision and lr_vision else [])  # what the groups hold, for gradient clipping
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)))

    def val_eval() -> tuple[float, float | None]:
        model.eval()
        with torch.no_grad():
            tot = sum(float(batch_loss(model, vlm, feats, val_ex[i:i + cfg.batch_size], cfg.key_token_weight,
                                       ce_only))
                      * len(val_ex[i:i + cfg.batch_size]) for i in range(0, len(val_ex), cfg.batch_size))
            toks = torch.cat([model.tokens_from_frozen(feats[[e.feat for e in val_ex[i:i + 64]]])
                              for i in range(0, len(val_ex), 64)])
        d, _ = vlm.verdict_logits(toks)
        return tot / len(val_ex), auroc(val_y, d.cpu().numpy())

    live = None
    if live_dir is not None and rt.main:
        from dvclive import Live

        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    best, best_state, bad, history = float("inf"), None, 0, []
    order: list[int] = []
    losses: list[float] = []
    step = 0
    stopped = False
    prog = Progress(log, "train", steps, "steps")
    while step < steps:
        if not order:
            order = rng.permutation(len(train_ex)).tolist()
        idx, order = order[:cfg.batch_size], order[cfg.batch_size:]
        batch = [train_ex[j] for j in idx]
        if feats_flip is not None:
            batch = [flipped_copy(e) if e.source in ("human", "paste") and rng.random() < 0.5 else e for e in batch]
        model.train()
        n, mine = rt.shards(len(batch), cfg.micro_batches)
        total = 0.0
        for shard, pos in mine:
            if not pos:  # an epoch's last batch, smaller than the shard count
                continue
            if n > 1:  # one shard keeps the stream seeded once above (the results measured before shards existed)
                seed_shard(cfg.seed, step, shard)
            part = batch_loss(model, vlm, feats, [batch[i] for i in pos], cfg.key_token_weight, loss_fn, feats_flip,
                              aux, cfg.aux_weight) / n
            part.backward()
            total += part.item()
        rt.sum_grads(trained)  # the shards of every process: the whole batch's gradient
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(rt.sum_scalar(total))
        step += 1
        prog.update(step, loss=float(np.mean(losses[-cfg.eval_every:])))
        if step % cfg.eval_every == 0 or step == steps:
            vl, auc = val_eval()
            h = {"step": step, "train_loss": float(np.mean(losses)), "val_loss": vl, "val_auroc": auc}
            history.append(h)
            losses = []
            log.info("step %d: train %.4f val %.4f val AUROC %s", step, h["train_loss"], vl, auc)
            if live is not None:
                live.step = step
                for k in ("train_loss", "val_loss", "val_auroc"):
                    if (val := h[k]) is not None:
                        live.log_metric(k, val)
                live.next_step()
            if vl < best - 1e-4:
                best, bad = vl, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= cfg.patience:
                    stopped = True
                    break
    if live is not None:
        live.end()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return TrainResult(history, best, step, stopped)


def calibrate(model: Any, vlm: Any, feats: torch.Tensor, val_ex: list[Example], val_rows: pd.DataFrame,
              schema: AnswerSchema) -> dict[str, Any]:
    """Verdict and type temperatures fitted on val (written into the model config), with val figures."""
    from edgeqa.evaluation.metrics import auroc
    from edgeqa.vlm.model import fit_temperature

    with torch.no_grad():
        toks = model.tokens_from_frozen(feats[[e.feat for e in val_ex]])
    d = vlm.verdict_logits(toks)[0].numpy()
    y = (val_rows.label == "defective").to_numpy().astype(int)
    tv = fit_temperature(d, y, binary=True)
    tt, type_acc = 1.0, None
    dv = np.flatnonzero(y == 1)
    if schema.types and len(dv) and val_rows.defect_type.iloc[dv].notna().all():
        lp = vlm.type_logprobs(toks[dv]).numpy()
        tgt = np.array([schema.types.index(t) for t in val_rows.defect_type.iloc[dv]])
        tt = fit_temperature(lp, tgt, binary=False)
        type_acc = float((lp.argmax(1) == tgt).mean())
    model.config.verdict_temperature, model.config.type_temperature = tv, tt
    vlm.verdict_temperature, vlm.type_temperature = tv, tt
    return {"val_auroc": auroc(y, d), "val_type_accuracy": type_acc, "verdict_temperature": tv,
            "type_temperature": tt}


def save_student(model: Any, base_tok: Any, out: Path) -> None:
    """save_pretrained (safetensors + config with the vocabulary map) and the teacher tokenizer beside it."""
    from edgeqa.student.model import TOKENIZER_DIR

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        base_tok.save_pretrained(tmp / TOKENIZER_DIR)


def check_ratio(min_ratio: float, student_params: int, teacher_params: int | None) -> float | None:
    if teacher_params is None:
        return None
    ratio = teacher_params / student_params
    if ratio < min_ratio:
        raise StageError(f"the student has {student_params:,} parameters, only {ratio:.1f}x fewer than the teacher's "
                         f"{teacher_params:,}; student.min_param_ratio asks for {min_ratio}x: shrink "
                         "student.decoder or student.vision_blocks")
    return ratio


@dataclass
class Fitted:
    model: Any
    train: TrainResult
    calibration: dict[str, Any]
    parameters: int
    teacher_parameters: int | None
    parameter_ratio: float | None
    main: bool = True  # rank 0 (or the only process): the one that writes files
    placement: dict[str, Any] = field(default_factory=dict)  # device, processes, micro_batches


def fit(cfg: StudentConfig, stage: StudentStageConfig, model: Any, vlm: Any, feats: torch.Tensor,
        train_ex: list[Example], val_ex: list[Example], val_rows: pd.DataFrame, schema: AnswerSchema,
        base_tok: Any, teacher_dir: Path, base_lm_dir: Path, out: Path, live_dir: Path | None,
        loss_fn: DistillLoss | None = None, feats_flip: torch.Tensor | None = None) -> Fitted:
    """The tail every student stage shares: full fine-tuning or LoRA (`stage.finetune`), train for
    `stage.steps`, merge LoRA, calibrate on val, check the parameter ratio against the teacher, save.
    Training runs on `student.device`, in one process or as one of torchrun's (edgeqa.distributed); the rest
    runs on the CPU, and only rank 0 saves."""
    rt = setup(cfg.device)
    if rt.distributed or rt.device.type != "cpu":
        log.info("training on %s, process %d of %d, %d shards per step", rt.device, rt.rank + 1, rt.world,
                 rt.n_shards(cfg.micro_batches))
    peft_model = apply_lora(cfg, model) if stage.finetune == "lora" else None
    if peft_model is None:
        model.set_trainable(vision=stage.lr_vision > 0)
    val_y = (val_rows.label == "defective").to_numpy().astype(int)
    dev = rt.device
    model.to(dev)
    tr = train(cfg, model, vlm, feats.to(dev), train_ex, val_ex, val_y, stage.steps, stage.lr, stage.lr_vision,
               live_dir if rt.main else None, loss_fn, None if feats_flip is None else feats_flip.to(dev), rt)
    model.to("cpu")
    if peft_model is not None:
        model = peft_model.merge_and_unload()
        vlm.lm, vlm.projector = model.decoder, model.projector
    cal = calibrate(model, vlm, feats, val_ex, val_rows, schema)
    from edgeqa.student.model import count_parameters

    n_student = count_parameters(model)
    n_teacher = teacher_parameters(teacher_dir, base_lm_dir)
    ratio = check_ratio(cfg.min_param_ratio, n_student, n_teacher)
    if rt.main:
        save_student(model, base_tok, out)
    rt.barrier()  # the model is saved before any process goes on
    return Fitted(model, tr, cal, n_student, n_teacher, ratio, rt.main, {"device": str(dev), "processes": rt.world,
                                                                        "micro_batches": cfg.micro_batches})
