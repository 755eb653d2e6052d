"""Stage `prune`: structured pruning of the best student with torch-pruning, iterative, recovered by KD.

1. Source: `prune.source`; `best` is the student (baseline, sft, distill) with the highest `val` AUROC in its
   own training report, so the pipeline never compresses a worse model when a better one exists. Never `test`.
2. What is pruned (each ratio is the share removed at the last step; step k removes k/steps of it):
   - the inner (expanded) channels of the trained trunk blocks (`student.frozen_blocks` ..): torch-pruning's
     `DependencyGraph` group of each block's expand conv (expand conv, its BN, the depthwise conv, its BN, the
     project conv's inputs). The block outputs, and so the cached frozen features, stay as they are;
   - the projector's hidden width, and each decoder layer's MLP width (gate/up outputs, down inputs): the
     `DependencyGraph` group of the first linear layer;
   - whole attention heads of each decoder layer (q/k/v rows and o columns of a head, together).
   Channels are ranked by the group's L2 magnitude (`GroupMagnitudeImportance`). The embeddings and the LM head
   tied to the vocabulary are never touched. Blocks before `student.frozen_blocks` are not pruned: their output
   is the cached feature every training stage reads (the report gives their share of the MACs).
3. After each step a short KD fine-tune (the `distill` loss on the teacher's soft targets) recovers, then the
   temperatures are refitted and the step is scored on `val`: AUROC, its paired bootstrap delta against the
   source, type accuracy, parameters, MACs and the measured PyTorch latency (batch 1, one thread).
4. Back-off: a step is within budget while the lower end of the 95 % interval of its val delta AUROC is at
   least `-prune.max_auroc_drop`. The first step out of budget stops the schedule; the last step within it is
   saved (step 0, the unpruned source, when none is). The pruned sizes go into the model config
   (`block_widths`, `projector_hidden`, the decoder's `intermediate_size` and heads), so `from_pretrained`
   rebuilds the pruned model exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeqa import benchrec
from edgeqa.config import PruneConfig, StudentConfig
from edgeqa.errors import StageError
from edgeqa.evaluation import metrics as M
from edgeqa.io import atomic_write_text, write_json
from edgeqa.report import fmt, md_table

log = logging.getLogger("edgeqa.prune")
STUDENTS = ("baseline", "sft", "distill")
ANSWER_TOKENS = 32  # decoder MACs are counted over the prompt, the image tokens and this many answer tokens


def pick_source(source: str, models_dir: Path, reports_dir: Path) -> tuple[str, dict[str, float | None]]:
    """The student to compress, and every student's val AUROC (from its training stage's metrics.json)."""
    val: dict[str, float | None] = {}
    for name in STUDENTS:
        f = reports_dir / name / "metrics.json"
        if f.is_file():
            val[name] = json.loads(f.read_text()).get("val_auroc")
    if source != "best":
        if not (models_dir / source / "config.json").is_file():
            raise StageError(f"prune.source {source!r}: {models_dir / source} holds no student; run that stage")
        return source, val
    scored = {k: v for k, v in val.items() if v is not None and (models_dir / k / "config.json").is_file()}
    if not scored:
        raise StageError(f"prune.source best: no student with a val_auroc in {reports_dir}/<student>/metrics.json"
                         f" (looked for {list(STUDENTS)})")
    # ties go to the earlier (simpler) student: baseline, then sft, then distill
    return max(scored, key=lambda k: (scored[k], -STUDENTS.index(k))), val


# ------------------------------------------------------------------------------------------ widths and pruning
@dataclass(frozen=True)
class Widths:
    blocks: dict[int, int]  # trained trunk block -> inner channels
    projector: int
    mlp: int  # every decoder layer's MLP width
    heads: int  # every decoder layer's attention heads

    def as_dict(self) -> dict[str, Any]:
        return {"blocks": {str(k): v for k, v in self.blocks.items()}, "projector": self.projector, "mlp": self.mlp,
                "heads": self.heads}


def widths_of(model: Any) -> Widths:
    from edgeqa.student.model import inner_width

    c = model.config
    dec = model.decoder.config
    return Widths({i: inner_width(model.vision.blocks[i]) for i in range(c.frozen_blocks, c.vision_blocks)},
                  int(model.projector.mlp[0].out_features), int(getattr(dec, "intermediate_size", 0) or 0),
                  int(getattr(dec, "num_attention_heads", 0) or 0))


def _keep(orig: int, ratio: float, k: int, steps: int, floor: int = 1) -> int:
    """Channels kept at step k of `steps` when `ratio` of `orig` goes by the last step; widths of 64 and more
    are rounded up to a multiple of 8 (what the CPU kernels like), so never more than the ratio is removed."""
    keep = orig - math.floor(orig * ratio * k / steps + 1e-9)
    if orig >= 64:
        keep = min(orig, 8 * math.ceil(keep / 8))
    return max(floor, keep)


def target_widths(orig: Widths, cfg: PruneConfig, k: int) -> Widths:
    return Widths({i: _keep(w, cfg.trunk_ratio, k, cfg.steps, 8) for i, w in orig.blocks.items()},
                  _keep(orig.projector, cfg.projector_ratio, k, cfg.steps),
                  _keep(orig.mlp, cfg.mlp_ratio, k, cfg.steps),
                  max(1, orig.heads - math.floor(orig.heads * cfg.head_ratio * k / cfg.steps + 1e-9)))


def _lowest(scores: Any, n: int) -> list[int]:
    return sorted(int(i) for i in scores.argsort()[:n])


def _prune_group(dg: Any, layer: Any, fn: Any, size: int, keep: int) -> None:
    """Prune the `size - keep` least important channels of `layer`'s dependency group."""
    import torch_pruning as tp

    n = size - keep
    if n <= 0:
        return
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    scores = imp(dg.get_pruning_group(layer, fn, idxs=list(range(size))))
    group = dg.get_pruning_group(layer, fn, idxs=_lowest(scores, n))
    if not dg.check_pruning_group(group):
        raise StageError(f"prune: torch-pruning refused the group of {layer} (it would remove every channel)")
    group.prune()


def _prune_heads(attn: Any, head_dim: int, keep: int) -> None:
    """Remove whole heads (q/k/v rows, o columns) by the L2 magnitude of all four; no grouped-query attention."""
    import torch
    import torch_pruning as tp

    n_heads = attn.q_proj.out_features // head_dim
    if attn.k_proj.out_features != attn.q_proj.out_features:
        raise StageError("prune.head_ratio: the decoder uses grouped-query attention (fewer k/v heads than q heads), "
                         "which head pruning does not handle; set prune.head_ratio: 0")
    n = n_heads - keep
    if n <= 0:
        return
    with torch.no_grad():
        s = sum(lin.weight.reshape(n_heads, head_dim, -1).pow(2).sum((1, 2))
                for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        s = s + attn.o_proj.weight.reshape(-1, n_heads, head_dim).pow(2).sum((0, 2))
    idxs = [h * head_dim + j for h in _lowest(s.sqrt(), n) for j in range(head_dim)]
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        tp.prune_linear_out_channels(lin, idxs)
    tp.prune_linear_in_channels(attn.o_proj, idxs)


def apply_widths(model: Any, w: Widths) -> None:
    """Prune `model` in place down to `w`, then write the sizes into its config (the round trip's half)."""
    import torch
    import torch_pruning as tp

    from edgeqa.student.model import inner_width

    c = model.config
    dec = model.decoder.config
    now = widths_of(model)
    if c.decoder.get("model_type") != "llama" and (w.mlp != now.mlp or w.heads != now.heads):
        raise StageError(f"prune.mlp_ratio / prune.head_ratio: the {c.decoder.get('model_type')} decoder is not "
                         "prunable here (GPT-2's Conv1D defeats torch-pruning); use student.decoder.arch: llama, or "
                         "set both ratios to 0")
    model.eval()
    if any(w.blocks[i] < now.blocks[i] for i in w.blocks):
        px = torch.zeros(1, 3, c.image_size, c.image_size)
        dg = tp.DependencyGraph().build_dependency(model.vision, example_inputs=px)
        for i, keep in w.blocks.items():
            b = model.vision.blocks[i]
            _prune_group(dg, b._expand_conv, tp.prune_conv_out_channels, inner_width(b), keep)
    mlp = model.projector.mlp
    if w.projector < now.projector:
        dg = tp.DependencyGraph().build_dependency(mlp, example_inputs=torch.zeros(2, mlp[0].in_features))
        _prune_group(dg, mlp[0], tp.prune_linear_out_channels, now.projector, w.projector)
    head_dim = int(getattr(dec, "head_dim", None) or dec.hidden_size // dec.num_attention_heads)
    for layer in model.decoder.model.layers if c.decoder.get("model_type") == "llama" else []:
        if w.mlp < now.mlp:
            m = layer.mlp
            dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.zeros(2, m.gate_proj.in_features))
            _prune_group(dg, m.gate_proj, tp.prune_linear_out_channels, now.mlp, w.mlp)
        if w.heads < now.heads:
            _prune_heads(layer.self_attn, head_dim, w.heads)
    got = widths_of_live(model, head_dim)
    c.block_widths = {str(i): v for i, v in got.blocks.items()}
    c.projector_hidden = model.projector.config.hidden = got.projector
    if c.decoder.get("model_type") == "llama":
        upd = {"intermediate_size": got.mlp, "num_attention_heads": got.heads, "num_key_value_heads": got.heads,
               "head_dim": head_dim}
        c.decoder = {**c.decoder, **upd}
        for k, v in upd.items():
            setattr(dec, k, v)


def widths_of_live(model: Any, head_dim: int) -> Widths:
    """The widths the layers really have (the configs are only updated from this)."""
    from edgeqa.student.model import inner_width

    c = model.config
    layers = model.decoder.model.layers if c.decoder.get("model_type") == "llama" else []
    mlp = {int(L.mlp.gate_proj.out_features) for L in layers}
    heads = {int(L.self_attn.q_proj.out_features) // head_dim for L in layers}
    if len(mlp) > 1 or len(heads) > 1:
        raise StageError(f"prune: decoder layers ended with different widths (mlp {mlp}, heads {heads}); the config "
                         "holds one per model")
    base = widths_of(model)
    return Widths({i: inner_width(model.vision.blocks[i]) for i in base.blocks},
                  int(model.projector.mlp[0].out_features), mlp.pop() if mlp else base.mlp,
                  heads.pop() if heads else base.heads)


# ------------------------------------------------------------------------------------------ measuring a step
def macs(model: Any, n_prompt: int) -> dict[str, int]:
    """MACs of the on-device path at batch 1: the trunk's frozen part, its trained part, the projector, and the
    decoder over the prompt, the image tokens and `ANSWER_TOKENS` answer tokens (one forward pass: what the KV
    cache spreads over the calls)."""
    import torch
    import torch_pruning as tp
    from torch import nn

    c = model.config

    class _Part(nn.Module):  # count_ops_and_params deep-copies what it is given: the model must be inside it
        def __init__(self, part: str):
            super().__init__()
            self.m, self.part = model, part

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.m
            if self.part == "frozen":
                return m.vision(x, 0, m.config.frozen_blocks)
            if self.part == "trained":
                return m.tokens_from_frozen(x)
            if self.part == "projector":
                return m.projector(x)
            return m.decoder(inputs_embeds=x).logits

    def count(part: str, x: torch.Tensor) -> int:
        return int(tp.utils.count_ops_and_params(_Part(part), x)[0])

    px = torch.zeros(1, 3, c.image_size, c.image_size)
    with torch.no_grad():
        h = model.frozen_features(px)
        toks = model.image_tokens(px)
    hidden = model.decoder.get_input_embeddings().weight.shape[1]
    seq = torch.zeros(1, n_prompt + c.grid * c.grid + ANSWER_TOKENS, hidden)
    frozen = count("frozen", px) if c.frozen_blocks else 0
    trained, proj, dec = count("trained", h), count("projector", toks), count("decoder", seq)
    out = {"trunk_frozen": int(frozen), "trunk_trained": int(trained), "projector": int(proj), "decoder": int(dec)}
    out["total"] = sum(out.values())
    return out


def latency_ms(model: Any, vlm: Any, paths: list[str], max_reason_tokens: int) -> dict[str, float]:
    """PyTorch, batch 1, one thread, image file to answer (decoding, the closed fields and the reason)."""
    import torch

    from edgeqa.vlm.vision import to_tensor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        with torch.inference_mode():
            for i, p in enumerate([paths[0], *paths]):  # the first call warms up, untimed
                t0 = time.perf_counter()
                tokens = model.image_tokens(to_tensor([p], model.config.image_size))
                vlm.predict(tokens, max_reason_tokens, 1)
                if i:
                    times.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {"p50": float(np.median(times)), "images": len(times)}


def source_targets(model: Any, vlm: Any, feats: Any, examples: list[Any], top_k: int, batch: int = 64) -> None:
    """Self-distillation targets (`prune.recovery.teacher: source`): the unpruned model's top-k log-probs at
    every answer position of every example, teacher-forced on the example's own answer, replace the examples'
    KD targets (`edgeqa.student.kd.Target`). Mirrored copies get none (the targets are of the unmirrored image)."""
    import torch

    with torch.no_grad():
        for i in range(0, len(examples), batch):
            part = examples[i:i + batch]
            tokens = model.tokens_from_frozen(feats[[e.feat for e in part]])
            seqs = [vlm.layout.answer_ids(e.answer, vlm.tok, e.reason_ids) for e in part]
            logits, _, _, prefix = vlm.answer_logits(tokens, seqs, 1.0)
            logp = torch.log_softmax(logits, -1)
            for r, (e, (ids, _)) in enumerate(zip(part, seqs)):
                top = logp[r, prefix - 1:prefix - 1 + len(ids)].topk(min(top_k, logp.shape[-1]), -1)
                e.kd = [(j, top.indices[j].tolist(), top.values[j].tolist()) for j in range(len(ids))]
                e.kd_flip_safe = 0


def within_budget(delta: dict[str, Any], max_drop: float) -> bool:
    """A step is within budget when the lower end of its paired bootstrap 95 % interval of val delta AUROC
    (step - source) is at least -max_drop: small val sets give wide intervals, so a bare difference would keep
    or reject steps by chance. No interval (one class on val) is out of budget: nothing shows it is safe."""
    low = delta.get("ci_low")
    return low is not None and low >= -max_drop - 1e-12


def val_logits(model: Any, vlm: Any, feats: Any, rows: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        toks = torch.cat([model.tokens_from_frozen(feats[rows[i:i + 64]]) for i in range(0, len(rows), 64)])
    return vlm.verdict_logits(toks)[0].numpy()


# ------------------------------------------------------------------------------------------ the stage
def run(cfg: PruneConfig, student: StudentConfig, models_dir: Path, reports_dir: Path, manifest: Path,
        labels_dir: Path, features_dir: Path, out: Path, metrics: Path | None = None, report: Path | None = None,
        live_dir: Path | None = None) -> dict[str, Any]:
    """Prune the source student in `models_dir` into `out` (see the module docstring)."""
    import torch

    from edgeqa.data.manifest import reference_answer
    from edgeqa.distributed import Runtime, resolve
    from edgeqa.student.distill import kd_examples
    from edgeqa.student.features import load as load_features
    from edgeqa.student.kd import DistillLoss
    from edgeqa.student.model import count_parameters
    from edgeqa.student.train import Example, calibrate, load_student, read_labels, read_splits, save_student, train
    from edgeqa.vlm.model import VisionLM

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    dev = resolve(student.device)  # recovery trains where the student stages train; measuring stays on the CPU
    source, val_aurocs = pick_source(cfg.source, models_dir, reports_dir)
    src_dir = models_dir / source
    st = load_student(src_dir, "prune")
    model, base_tok, tok, layout, schema = st.model.eval(), st.base_tok, st.tok, st.layout, st.schema
    if model.config.frozen_blocks != student.frozen_blocks or model.config.vision_blocks != student.vision_blocks:
        raise StageError(f"prune: {src_dir} was trained with vision_blocks {model.config.vision_blocks} / "
                         f"frozen_blocks {model.config.frozen_blocks}, but params.yaml's student section says "
                         f"{student.vision_blocks} / {student.frozen_blocks}; rerun the student stages (dvc repro)")
    sp = read_splits(manifest, "prune")
    lab, unl, val = sp.labelled, sp.unlabelled, sp.val
    rc = cfg.recovery
    kx = kd_examples(layout, tok, lab, unl, read_labels(labels_dir), rc.weights, rc.top_k, "prune.recovery.weights")
    shas = kx.shas + list(val.sha256)
    val_ex = [Example(len(kx.shas) + i, reference_answer(r), "human", 1.0) for i, (_, r) in enumerate(val.iterrows())]
    val_rows = [e.feat for e in val_ex]
    feats, feats_flip = load_features(student, features_dir, shas)
    y = (val.label == "defective").to_numpy().astype(int)
    lat_paths = [str(p) for p in val.sort_values("sha256").path.head(cfg.latency_images)]
    n_prompt = len(layout.pre) + len(layout.post)
    loss = DistillLoss(alpha=rc.alpha, temperature=rc.temperature)
    if rc.teacher == "source" and rc.alpha > 0:
        source_targets(model, VisionLM(model.decoder, tok, model.projector, layout), feats, kx.examples, rc.top_k)

    def vlm_of(m: Any) -> Any:
        return VisionLM(m.decoder, tok, m.projector, layout, m.config.verdict_temperature, m.config.type_temperature)

    def measure(m: Any, k: int, d_ref: np.ndarray | None, cal: dict[str, Any], secs: float
                ) -> tuple[dict[str, Any], np.ndarray]:
        d = val_logits(m, vlm_of(m), feats, val_rows)
        delta = M.bootstrap_delta_auroc(y, d_ref if d_ref is not None else d, d, cfg.bootstrap, cfg.seed + k)
        return {"step": k, "widths": widths_of(m).as_dict(), "parameters": count_parameters(m),
                "macs": macs(m, n_prompt),
                "latency_ms": latency_ms(m, vlm_of(m), lat_paths, cfg.max_reason_tokens),
                "val_auroc": M.auroc(y, d), "val_type_accuracy": cal.get("val_type_accuracy"),
                "delta_auroc": delta, "within_budget": k == 0 or within_budget(delta, cfg.max_auroc_drop),
                "recovery": None, "seconds": round(secs, 2)}, d

    orig = widths_of(model)
    cal0 = calibrate(model, vlm_of(model), feats, val_ex, val, schema)  # the source's own val figures, refitted
    step0, d_src = measure(model, 0, None, cal0, 0.0)
    steps = [step0]
    kept, kept_step = copy.deepcopy(model), 0
    for k in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        apply_widths(model, target_widths(orig, cfg, k))
        model.set_trainable(vision=rc.lr_vision > 0)
        vlm = vlm_of(model)
        model.to(dev)
        tr = train(student, model, vlm, feats.to(dev), kx.examples, val_ex, y, rc.steps, rc.lr, rc.lr_vision, None,
                   loss, feats_flip.to(dev) if student.augment_flip and feats_flip is not None else None,
                   Runtime(dev))
        model.to("cpu")
        cal = calibrate(model, vlm, feats, val_ex, val, schema)
        rec, _ = measure(model, k, d_src, cal, time.perf_counter() - t0)
        rec["recovery"] = {"steps_run": tr.steps_run, "best_val_loss": tr.best_val_loss,
                           "stopped_early": tr.stopped_early}
        steps.append(rec)
        log.info("prune step %d: %s", k, {x: rec[x] for x in ("widths", "parameters", "val_auroc", "within_budget")})
        if not rec["within_budget"]:
            break
        kept, kept_step = copy.deepcopy(model), k
    kept.config.lineage = {"source": source, "pruning_step": kept_step, "steps": cfg.steps}
    save_student(kept, base_tok, out)
    chosen = steps[kept_step]
    res: dict[str, Any] = {
        "source": source, "source_rule": cfg.source, "val_auroc_by_student": val_aurocs, "kept_step": kept_step,
        "steps_run": len(steps) - 1, "backed_off": kept_step < cfg.steps,
        "parameters": chosen["parameters"], "parameters_source": step0["parameters"],
        "macs": chosen["macs"]["total"], "macs_source": step0["macs"]["total"],
        "macs_ratio": chosen["macs"]["total"] / step0["macs"]["total"],
        "latency_p50_ms": chosen["latency_ms"]["p50"], "latency_p50_ms_source": step0["latency_ms"]["p50"],
        "latency_ratio": chosen["latency_ms"]["p50"] / step0["latency_ms"]["p50"],
        "val_auroc": chosen["val_auroc"], "val_auroc_source": step0["val_auroc"],
        "val_type_accuracy": chosen["val_type_accuracy"], "history": steps, "cpu": benchrec.cpu(),
        "seconds": round(time.perf_counter() - t_start, 2)}
    if live_dir is not None:
        from dvclive import Live

        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
        for s in steps:
            live.step = s["step"]
            live.log_metric("val_auroc", s["val_auroc"] if s["val_auroc"] is not None else float("nan"))
            live.log_metric("macs_m", s["macs"]["total"] / 1e6)
            live.log_metric("latency_p50_ms", s["latency_ms"]["p50"])
            live.log_metric("parameters", s["parameters"])
            live.next_step()
        live.end()
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, render(res, cfg))
    log.info("prune: %s step %d of %d -> %s (%d params, MACs x%.2f, latency x%.2f)", source, kept_step, cfg.steps,
             out, res["parameters"], res["macs_ratio"], res["latency_ratio"])
    return res


def render(res: dict[str, Any], cfg: PruneConfig) -> str:
    f3 = lambda v: fmt(v, 3)  # noqa: E731
    rows = []
    for s in res["history"]:
        d = s["delta_auroc"]
        ci = f"[{f3(d.get('ci_low'))}, {f3(d.get('ci_high'))}]" if s["step"] and d.get("delta") is not None else ""
        w = s["widths"]
        mc = s["macs"]
        rows.append([s["step"], "/".join(str(v) for v in w["blocks"].values()), w["projector"], w["mlp"], w["heads"],
                     f"{s['parameters']:,}", f"{mc['total'] / 1e6:.1f}", f"{mc['trunk_frozen'] / 1e6:.1f}",
                     f"{s['latency_ms']['p50']:.1f}", f3(s["val_auroc"]), f3(d.get("delta") if s["step"] else None),
                     ci, f3(s["val_type_accuracy"]), "yes" if s["within_budget"] else "**no**",
                     "**kept**" if s["step"] == res["kept_step"] else ""])
    lines = [
        "# prune: structured pruning with KD recovery\n",
        f"Source: **{res['source']}** (rule `{res['source_rule']}`; val AUROC by student: "
        + ", ".join(f"{k} {f3(v)}" for k, v in res["val_auroc_by_student"].items()) + ").\n",
        f"Ratios removed by step {cfg.steps}: trunk inner channels {cfg.trunk_ratio}, projector {cfg.projector_ratio},"
        f" decoder MLP {cfg.mlp_ratio}, heads {cfg.head_ratio}. Recovery per step: {cfg.recovery.steps} KD steps "
        f"(alpha {cfg.recovery.alpha}, T {cfg.recovery.temperature}). Budget: the lower end of the paired bootstrap "
        f"95 % interval of val delta AUROC (step - source) >= -{cfg.max_auroc_drop}.\n",
        f"Kept: **step {res['kept_step']}**" + (" (backed off)" if res["backed_off"] else "")
        + f". MACs x{res['macs_ratio']:.2f}, parameters {res['parameters']:,} of {res['parameters_source']:,}, "
        f"PyTorch latency x{res['latency_ratio']:.2f} (batch 1, one thread, {res['cpu']}). The edge latency is "
        "`make bench`'s.\n",
        md_table(["step", "trunk blocks inner", "projector", "MLP", "heads", "parameters", "MMACs",
                  "of which frozen trunk", "p50 ms", "val AUROC", "delta", "95 % CI", "val type acc.",
                  "within budget", ""], rows),
        "\nMACs: the whole on-device path at batch 1, the decoder over the prompt, the image tokens and "
        f"{ANSWER_TOKENS} answer tokens. The frozen trunk blocks are not pruned (their output is the cached "
        "feature every student stage trains on).\n",
    ]
    return "\n".join(lines) + "\n"
