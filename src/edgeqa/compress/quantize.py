"""Stage `quantize`: the pruned student -> ONNX (FP32) -> INT8 where it keeps the answers -> the edge bundle.

1. Source: the `prune` stage's output (models/pruned), which names the student it came from (`prune.source`
   chose it on `val`) in its config's `lineage`.
2. Export to the two graphs of `edgeqa.student.export` (vision; decoder with its KV cache), FP32. Parity with
   PyTorch on `val`: max abs difference of the prefix embeddings and of the verdict-position logits, and the
   share of identical answers (verdict, type, location, reason).
3. INT8 with `onnxruntime.quantization`: `quant_pre_process`, then static QDQ (per-channel weights, U8 activations,
   S8 weights), only on `quantize.op_types`, calibrated on `labelled` (training) images. The decoder is calibrated
   on the inputs it really sees: every decoder call of the FP32 bundle answering those images is recorded.
4. Each graph alone in INT8, and then both, answer `val`; a graph is kept in INT8 only where the answers agree
   with FP32 (same verdict, type and location) on at least `quantize.min_agreement` of the images. The
   delta-AUROC against FP32 comes with a paired bootstrap interval. A graph that fails stays FP32; the report
   says so.
5. The operating threshold on P(defective) is fitted on `val` with the shipped graphs (`quantize.threshold`).
6. The bundle (`edgeqa_runtime.bundle`) is assembled under a temp name and published by rename; manifest.json,
   with every file's SHA-256, is written last.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from edgeqa import benchrec
from edgeqa.config import QuantizeConfig, ThresholdRule
from edgeqa.errors import StageError
from edgeqa.evaluation import metrics as M
from edgeqa.io import atomic_dir, atomic_write_text, write_json
from edgeqa.report import fmt, md_table
from edgeqa_runtime.bundle import file_entries, write_manifest
from edgeqa_runtime.files import folder_fingerprint
from edgeqa_runtime.preprocess import pixels
from edgeqa_runtime.session import DECODER, RUNTIME, VISION, OrtStudent

log = logging.getLogger("edgeqa.quantize")
GRAPHS = {"vision": VISION, "decoder": DECODER}


class _Recording(OrtStudent):
    """The FP32 bundle answering calibration images, keeping every decoder input it sees."""

    def __init__(self, folder: Path, threads: int):
        super().__init__(folder, threads)
        self.vision_feeds: list[dict[str, np.ndarray]] = []
        self.decoder_feeds: list[dict[str, np.ndarray]] = []

    def answer(self, pixels: np.ndarray, max_reason_tokens: int, top_k: int = 1, strict: bool = False
               ) -> dict[str, Any]:
        self.vision_feeds.append({"pixels": pixels.astype(np.float32)})
        return super().answer(pixels, max_reason_tokens, top_k, strict)

    def _run(self, embeds: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        self.decoder_feeds.append(self.feeds(embeds, past))
        return super()._run(embeds, past)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_graph(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], cfg: QuantizeConfig) -> None:
    """Static QDQ INT8 of one graph: pre-processing (shape inference, optimisation), then MinMax calibration on
    `feeds`, per-channel S8 weights and U8 activations, only on `cfg.op_types`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as exc:  # symbolic shape inference can refuse a graph: quantize the export as is
            log.warning("quant_pre_process failed on %s (%s); quantizing without it", src.name, exc)
            shutil.copy(src, pre)
        quantize_static(str(pre), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=cfg.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(cfg.op_types), calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def choose_precision(trial: Callable[[str, dict[str, str]], dict[str, Any]]) -> dict[str, str]:
    """Each graph alone in INT8 (the other FP32); both together where both pass alone. A graph whose trial does
    not pass stays FP32; where each passes alone but not together, the one with the higher agreement is kept."""
    alone = {g: trial(g, {h: ("int8" if h == g else "fp32") for h in GRAPHS}) for g in GRAPHS}
    passing = [g for g in GRAPHS if alone[g]["passed"]]
    if len(passing) == len(GRAPHS) and not trial("both", dict.fromkeys(GRAPHS, "int8"))["passed"]:
        passing = [max(passing, key=lambda g: alone[g]["agreement"])]
    return {g: ("int8" if g in passing else "fp32") for g in GRAPHS}


def fit_threshold(y: np.ndarray, p: np.ndarray, rule: ThresholdRule) -> dict[str, Any]:
    """The operating threshold on P(defective): a verdict is `defective` when P >= threshold."""
    y = np.asarray(y).astype(int)
    if rule.rule == "fixed" or y.sum() == 0:
        t = rule.value
        why = "fixed" if rule.rule == "fixed" else "no defective val image: the fixed value"
    else:
        pd_ = np.sort(p[y == 1])
        allowed = int(np.floor(rule.max_miss_rate * len(pd_) + 1e-9))  # misses allowed on val
        # the highest threshold that misses at most `allowed` defective images: the (allowed+1)-th lowest score
        t = float(pd_[allowed])
        why = f"highest threshold with val miss rate <= {rule.max_miss_rate} ({allowed} of {len(pd_)} misses allowed)"
    pred = (p >= t).astype(int)
    vm = M.verdict_metrics(y, pred, p)
    return {"threshold": float(t), "rule": rule.rule, "why": why, "val_miss_rate": vm.get("miss_rate"),
            "val_overkill_rate": vm.get("overkill_rate")}


def _answers(model: OrtStudent, paths: Sequence[str], max_reason_tokens: int
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """The model's records on `paths`, the closed fields + reason + P of each (what agreement compares), and
    the seconds it took."""
    t0 = time.perf_counter()
    raw = model.predict_paths(paths, max_reason_tokens)
    secs = time.perf_counter() - t0
    flat = [{"verdict": r["answer"]["verdict"], "type": r["answer"]["defect_type"],
             "location": r["answer"]["location"], "reason": r["answer"]["reason"], "p_defective": r["p_defective"]}
            for r in raw]
    return raw, flat, secs


def _assemble(fp32: Path, int8: Path, precision: dict[str, str], dst: Path) -> None:
    """A bundle folder (no manifest yet) with each graph in the given precision."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in file_entries(fp32):
        if name not in GRAPHS.values():
            shutil.copy(fp32 / name, dst / name)
    for g, fname in GRAPHS.items():
        shutil.copy((int8 if precision[g] == "int8" else fp32) / fname, dst / fname)


def _set_runtime(folder: Path, **kv: Any) -> None:
    rt = json.loads((folder / RUNTIME).read_text())
    rt.update(kv)
    (folder / RUNTIME).write_text(json.dumps(rt) + "\n")


def _parity(student_dir: Path, ort: OrtStudent, paths: Sequence[str], ort_answers: Sequence[dict[str, Any]],
            max_reason_tokens: int, threads: int) -> dict[str, Any]:
    """FP32 ONNX (`ort`, whose answers on `paths` are `ort_answers`) against PyTorch on the same images: max abs
    differences of the image embeddings and of the verdict logits, and the share of identical answers."""
    import torch

    from edgeqa.student.model import Student

    torch_student = Student(student_dir, threads)
    px = pixels(list(paths), int(ort.rt["image_size"]))
    with torch.inference_mode():
        want = torch_student.model.image_embeds(torch.from_numpy(px)).numpy()
    got = np.concatenate([ort.vision.run(None, {"pixels": px[i:i + 1]})[0] for i in range(len(px))])
    L = ort.L
    emb_t = torch_student.model.decoder.get_input_embeddings()
    with torch.inference_mode():
        ctx = torch.cat([emb_t(torch.tensor([L["pre"]])), torch.from_numpy(want[:1]),
                         emb_t(torch.tensor([L["post"] + L["field_ids"]["verdict"]]))], 1)
        lt = torch_student.model.decoder(inputs_embeds=ctx).logits[0, -1].numpy()
    lo, _ = ort._run(ctx.numpy(), ort._empty_past())
    a = torch_student.predict_paths(list(paths), max_reason_tokens)
    same = [x["answer"] == y["answer"] for x, y in zip(a, ort_answers)]
    return {"max_abs_image_embeds": float(np.abs(want - got).max()),
            "max_abs_verdict_logits": float(np.abs(lt - lo[0, -1]).max()),
            "identical_answers": float(np.mean(same)), "images": len(same)}


def run(cfg: QuantizeConfig, src: Path, manifest: Path, out: Path, metrics: Path | None = None,
        report: Path | None = None) -> dict[str, Any]:
    """Build the edge bundle `out` from the (pruned) student folder `src` (see the module docstring)."""
    from edgeqa.student.export import export
    from edgeqa.student.model import is_student_folder

    t_start = time.perf_counter()
    if not is_student_folder(src):
        raise StageError(f"quantize: {src} is not a student folder; run the prune stage first")
    lineage = json.loads((src / "config.json").read_text()).get("lineage") or {}
    source = lineage.get("source", src.name)
    df = pd.read_parquet(manifest)
    val = df[df.split == "val"].reset_index(drop=True)
    calib = df[df.split == "labelled"].sort_values("sha256").head(cfg.calibration_images)
    if val.empty or calib.empty:
        raise StageError(f"quantize: {manifest} needs val and labelled images (got {len(val)} and {len(calib)})")
    y = (val.label == "defective").to_numpy().astype(int)
    vpaths = [str(p) for p in val.path]
    res: dict[str, Any] = {"source": source, "lineage": lineage, "val_images": len(val),
                           "calibration_images": len(calib),
                           "calibration_splits": sorted(set(calib.split)),
                           "cpu": benchrec.cpu()}
    with tempfile.TemporaryDirectory(prefix="edgeqa-quantize-") as work:
        w = Path(work)
        fp32, int8 = w / "fp32", w / "int8"
        export(src, fp32)
        fp32_model = OrtStudent(fp32, cfg.threads)
        ref_raw, ref, t_ref = _answers(fp32_model, vpaths, cfg.max_reason_tokens)
        res["parity"] = _parity(src, fp32_model, vpaths, ref_raw, cfg.max_reason_tokens, cfg.threads)
        rec = _Recording(fp32, cfg.threads)
        rec.predict_paths([str(p) for p in calib.path], cfg.max_reason_tokens)
        int8.mkdir()
        for g, fname in GRAPHS.items():
            feeds = rec.vision_feeds if g == "vision" else rec.decoder_feeds
            quantize_graph(fp32 / fname, int8 / fname, feeds, cfg)
        res["decoder_calibration_calls"] = len(rec.decoder_feeds)
        p_ref = np.array([r["p_defective"] for r in ref])
        trials: dict[str, dict[str, Any]] = {}
        p_by_precision = {tuple(sorted(dict.fromkeys(GRAPHS, "fp32").items())): p_ref}  # val P of each tried mix

        def trial(name: str, precision: dict[str, str]) -> dict[str, Any]:
            d = w / f"trial-{name}"
            _assemble(fp32, int8, precision, d)
            _, got, secs = _answers(OrtStudent(d, cfg.threads, verify_files=False), vpaths, cfg.max_reason_tokens)
            p = np.array([r["p_defective"] for r in got])
            p_by_precision[tuple(sorted(precision.items()))] = p
            ag = M.agreement(ref, got)
            t = {"precision": precision, "agreement": ag["closed_fields"], "verdict_agreement": ag["verdict"],
                 "same_reason": float(np.mean([a["reason"] == b["reason"] for a, b in zip(ref, got)])),
                 "delta_auroc": M.bootstrap_delta_auroc(y, p_ref, p, cfg.bootstrap, cfg.seed),
                 "max_abs_p_defective": float(np.abs(p - p_ref).max()),
                 "val_seconds": round(secs, 3), "passed": (ag["closed_fields"] or 0.0) >= cfg.min_agreement}
            trials[name] = t
            return t

        precision = choose_precision(trial)
        res.update(trials=trials, precision=precision, val_seconds_fp32=round(t_ref, 3))
        chosen = w / "chosen"
        _assemble(fp32, int8, precision, chosen)
        p_shipped = p_by_precision[tuple(sorted(precision.items()))]  # every choice is a mix already tried
        thr = fit_threshold(y, p_shipped, cfg.threshold)
        res["threshold"] = thr
        res["val_auroc_shipped"] = M.auroc(y, p_shipped)
        with atomic_dir(out) as tmp:
            shutil.copytree(chosen, tmp, dirs_exist_ok=True)
            _set_runtime(tmp, threshold=thr["threshold"], max_reason_tokens=cfg.max_reason_tokens)
            m = write_manifest(tmp, version=f"{source}-{folder_fingerprint(tmp)[:12]}", source=source, graphs=precision,
                               threshold=thr, opset=_opsets(tmp))
        res["fp32_bytes"] = sum(e["bytes"] for e in file_entries(fp32).values())
    res["bundle_bytes"] = sum(e["bytes"] for e in m["files"].values()) + (out / "manifest.json").stat().st_size
    res["bundle_files"] = {k: v["bytes"] for k, v in m["files"].items()}
    res["version"] = m["version"]
    res["seconds"] = round(time.perf_counter() - t_start, 2)
    if metrics:
        write_json(metrics, res)
    if report:
        atomic_write_text(report, render(res, cfg))
    log.info("quantize: %s -> %s (%s), %d bytes, threshold %.3f", source, out, precision, res["bundle_bytes"],
             thr["threshold"])
    return res


def _opsets(folder: Path) -> dict[str, int]:
    import onnx

    out = {}
    for g, fname in GRAPHS.items():
        m = onnx.load(str(folder / fname), load_external_data=False)
        out[g] = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return out


def render(res: dict[str, Any], cfg: QuantizeConfig) -> str:
    f3 = lambda v: fmt(v, 3)  # noqa: E731
    rows = []
    for name, t in res["trials"].items():
        d = t["delta_auroc"]
        ci = f"[{f3(d['ci_low'])}, {f3(d['ci_high'])}]" if d.get("delta") is not None else "n/a"
        rows.append([name, f"vision {t['precision']['vision']}, decoder {t['precision']['decoder']}",
                     f3(t["agreement"]), f3(t["same_reason"]), f3(d.get("delta")), ci, f3(t["max_abs_p_defective"]),
                     t["val_seconds"], "yes" if t["passed"] else "no"])
    par = res["parity"]
    thr = res["threshold"]
    kept = [g for g, p in res["precision"].items() if p == "fp32"]
    lines = [
        "# quantize: the edge bundle\n",
        f"Source: the pruned **{res['source']}** student (pruning step {res['lineage'].get('pruning_step', 'n/a')} "
        f"of {res['lineage'].get('steps', 'n/a')}; the prune report says why that student and that step).\n",
        f"Shipped graphs: vision **{res['precision']['vision']}**, decoder **{res['precision']['decoder']}**"
        + (f"; stays FP32 (INT8 agreement below {cfg.min_agreement}): {', '.join(kept)}" if kept else "") + ".\n",
        "## FP32 export against PyTorch (val)\n",
        md_table(["max abs image embeds", "max abs verdict logits", "identical answers", "images"],
                 [[f"{par['max_abs_image_embeds']:.2e}", f"{par['max_abs_verdict_logits']:.2e}",
                   f3(par["identical_answers"]), par["images"]]]),
        f"\n## INT8 against FP32 on val ({res['val_images']} images; calibration: {res['calibration_images']} "
        f"labelled images, {res['decoder_calibration_calls']} decoder calls)\n",
        "Agreement: same verdict, type and location. delta AUROC = INT8 - FP32, paired bootstrap 95 % CI. "
        f"FP32 answered val in {res['val_seconds_fp32']} s here ({res['cpu']}); latency figures belong to "
        "`make bench`.\n",
        md_table(["trial", "graphs", "agreement", "same reason", "delta AUROC", "95 % CI", "max abs dP",
                  "val seconds", f"passes >= {cfg.min_agreement}"], rows),
        "\n## Operating threshold (val)\n",
        md_table(["threshold", "rule", "val miss rate", "val overkill rate"],
                 [[f3(thr["threshold"]), thr["why"], f3(thr["val_miss_rate"]), f3(thr["val_overkill_rate"])]]),
        f"\n## Bundle `{res['version']}`: {res['bundle_bytes']:,} bytes (FP32 export: {res['fp32_bytes']:,})\n",
        md_table(["file", "bytes"], [[k, f"{v:,}"] for k, v in res["bundle_files"].items()]),
    ]
    return "\n".join(lines) + "\n"
