"""Drift: the answers the line sent back (prediction logs under feedback/) against what the released model
answered on the `test` split (`evaluate@edge`), and the image sizes the manifest recorded for training.

Rules (thresholds in `ops.drift`):
- the population stability index (PSI) of P(defective), over 10 quantile bins of the test split's scores;
- the share of images answered defective, against the test split's share;
- the share of images whose size (width × height) no training image had (a new camera or crop);
- the brightness shift and the contrast shift: how far the batch's mean grayscale brightness (and contrast, the
  image's standard deviation) moved from a fixed sample of the training images (`reference_images` of labelled
  + unlabelled), in training standard deviations. A mean, not a PSI: a PSI over 10 bins has an expected value
  near 9/n on a batch of n from the same distribution (0.18 at 50 images), too close to any useful threshold;
  a batch mean's noise is 1/sqrt(n) standard deviations (0.14 at 50);
- the embedding shift: the distance between the batch's mean image embedding (the model's mean image token,
  logged by `predict --log`) and the training sample's, in units of the training sample's RMS spread around its
  mean. Only lines of the bundle the reference was computed with are compared: another model's embeddings live
  in another space.

A batch smaller than `ops.drift.min_batch` gets no verdict. An image rule whose lines are fewer than that (logs
written before the statistics were logged, or another bundle's) is reported as not compared, never as passed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from edgeqa.config.schema import DriftConfig

EPS = 1e-4
DECIMALS = 6  # P(defective) as the prediction log records it


def psi(reference: np.ndarray, new: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `new` against `reference`, over the reference's quantile bins."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    r = np.histogram(reference, edges)[0] / len(reference)
    n = np.histogram(new, edges)[0] / len(new)
    r, n = np.clip(r, EPS, None), np.clip(n, EPS, None)
    return float(np.sum((n - r) * np.log(n / r)))


def embedding_shift(reference: np.ndarray, new: np.ndarray) -> float:
    """|mean(new) - mean(reference)| / sqrt(mean |x - mean(reference)|^2 over the reference)."""
    mu = reference.mean(0)
    spread = float(np.sqrt(np.mean(np.sum((reference - mu) ** 2, axis=1))))
    return float(np.linalg.norm(new.mean(0) - mu) / max(spread, 1e-12))


def _image_rules(cfg: DriftConfig, image_ref: dict[str, Any] | None, batch: list[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """The brightness, contrast and embedding rules; a rule without enough lines to compare is not compared."""
    out: list[dict[str, Any]] = []

    def rule(name: str, value: float | None, limit: float, why: str = "") -> None:
        out.append({"rule": name, "value": None if value is None else round(float(value), 4), "max": limit,
                    "passed": None if value is None else bool(value <= limit), **({"why": why} if why else {})})

    if image_ref is None:
        for name, lim in (("brightness_shift", cfg.max_image_shift), ("contrast_shift", cfg.max_image_shift),
                          ("embedding_shift", cfg.max_embedding_shift)):
            rule(name, None, lim, "no training reference")
        return out
    for stat in ("brightness", "contrast"):
        vals = np.array([b[stat] for b in batch if stat in b], dtype=float)
        if len(vals) < cfg.min_batch:
            rule(f"{stat}_shift", None, cfg.max_image_shift, f"{len(vals)} lines carry {stat} (< min_batch)")
        else:
            ref = np.asarray(image_ref[stat], dtype=float)
            rule(f"{stat}_shift", abs(vals.mean() - ref.mean()) / max(float(ref.std()), 1e-6), cfg.max_image_shift)
    ref_emb, bundle = image_ref.get("embedding"), image_ref.get("bundle")
    same = [b["embedding"] for b in batch if "embedding" in b and b["bundle"] == bundle]
    if ref_emb is None:
        rule("embedding_shift", None, cfg.max_embedding_shift, image_ref.get("why", "no reference embeddings"))
    elif len(same) < cfg.min_batch:
        rule("embedding_shift", None, cfg.max_embedding_shift,
             f"{len(same)} lines carry an embedding of bundle {bundle} (< min_batch)")
    elif any(len(e) != ref_emb.shape[1] for e in same):
        rule("embedding_shift", None, cfg.max_embedding_shift, "embedding width differs from the reference's")
    else:
        rule("embedding_shift", embedding_shift(ref_emb, np.asarray(same, dtype=float)), cfg.max_embedding_shift)
    return out


def check(cfg: DriftConfig, reference: list[dict[str, Any]], training_sizes: set[tuple[int, int]],
          batch: list[dict[str, Any]], image_ref: dict[str, Any] | None = None) -> dict[str, Any]:
    """The drift report: each rule's value, threshold and verdict; `drifted` when any rule fails. `image_ref`:
    the training sample's `brightness` and `contrast` (arrays), `embedding` ((N, d) or None) and the `bundle`
    those embeddings came from."""
    from scipy.stats import ks_2samp

    if not reference:
        raise ValueError("no reference predictions (evaluate@edge on test): run the pipeline first")
    # both at the log's precision (the runtime rounds P to 6 decimals): a score tied at a bin edge must land
    # in the same bin on both sides, or identical answers would look like drift
    p_ref = np.round(np.array([r["p_defective"] for r in reference], dtype=float), DECIMALS)
    rate_ref = float(np.mean([r["verdict"] == "defective" for r in reference]))
    out: dict[str, Any] = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "n": len(batch),
                           "n_reference": len(reference), "min_batch": cfg.min_batch,
                           "bundles": sorted({b["bundle"] for b in batch}), "rules": []}
    if len(batch) < cfg.min_batch:
        out.update(drifted=None, summary=f"{len(batch)} answers < ops.drift.min_batch {cfg.min_batch}: no verdict")
        return out
    p_new = np.round(np.array([b["p_defective"] for b in batch], dtype=float), DECIMALS)
    rate_new = float(np.mean([b["verdict"] == "defective" for b in batch]))
    unseen = float(np.mean([(b["width"], b["height"]) not in training_sizes for b in batch]))
    rules = [("psi_p_defective", psi(p_ref, p_new), cfg.max_psi),
             ("defect_rate_shift", abs(rate_new - rate_ref), cfg.max_defect_rate_shift),
             ("unseen_size_share", unseen, cfg.max_unseen_size_share)]
    out["rules"] = [{"rule": name, "value": round(v, 4), "max": t, "passed": v <= t} for name, v, t in rules]
    out["rules"] += _image_rules(cfg, image_ref, batch)
    out["defect_rate"] = {"reference": round(rate_ref, 4), "batch": round(rate_new, 4)}
    out["ks_p_defective"] = {k: round(float(v), 4) for k, v in zip(("statistic", "pvalue"), ks_2samp(p_ref, p_new))}
    failed = [r for r in out["rules"] if r["passed"] is False]
    out["drifted"] = bool(failed)
    out["summary"] = ("drift: " + "; ".join(f"{r['rule']} {r['value']} > {r['max']}" for r in failed) if failed
                      else f"no drift in {len(batch)} answers (every rule compared is within its threshold"
                      + (f"; not compared: {', '.join(r['rule'] for r in out['rules'] if r['passed'] is None)})"
                         if any(r["passed"] is None for r in out["rules"]) else ")"))
    return out


def render(rep: dict[str, Any]) -> str:
    lines = [f"# drift: {'DRIFT' if rep['drifted'] else 'none' if rep['drifted'] is False else 'no verdict'}", "",
             rep["summary"], "", f"- answers: {rep['n']} (bundles {', '.join(rep['bundles']) or '-'}); "
             f"reference: {rep['n_reference']} test answers of evaluate@edge", ""]
    if rep["rules"]:
        lines += ["| rule | value | max | passed |", "|---|---|---|---|"]
        lines += [f"| {r['rule']} | {r['value'] if r['value'] is not None else '-'} | {r['max']} | "
                  f"{'yes' if r['passed'] else 'NO' if r['passed'] is False else 'not compared: ' + r.get('why', '')} |"
                  for r in rep["rules"]]
        lines += ["", f"KS test of P(defective): {rep['ks_p_defective']}"]
    return "\n".join(lines) + "\n"


def reference_sample(paths: list[str], n: int) -> list[str]:
    """A fixed sample of `n` paths spread evenly over the whole list, first to last. The manifest lists images
    by category and class, so a sample must span it: every (len // n)-th path, cut at n, took the first 200 of
    392 demo images, 196 of them bottles and 4 tiles, and a batch of both looked like 3 standard deviations of
    brightness drift."""
    if len(paths) <= n:
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def training_reference(paths: list[str], n: int, bundle_dir: Any | None) -> dict[str, Any]:
    """The image rules' reference: brightness and contrast of a fixed sample of `n` training images and, with an
    edge bundle folder, their mean image tokens under it."""
    from edgeqa_runtime.predlog import image_stats

    sample = reference_sample(paths, n)
    stats = np.asarray([image_stats(Path(p))[2:] for p in sample], dtype=np.float64)
    ref: dict[str, Any] = {"n": len(sample), "brightness": stats[:, 0], "contrast": stats[:, 1], "embedding": None,
                           "bundle": None}
    if bundle_dir is None:
        ref["why"] = "no edge bundle in the checkout (models/edge)"
        return ref
    from edgeqa_runtime.preprocess import pixels
    from edgeqa_runtime.session import OrtStudent

    model = OrtStudent(bundle_dir, 1)
    size = int(model.rt["image_size"])
    ref["embedding"] = np.concatenate([model.embed(pixels(sample[i:i + 16], size))
                                       for i in range(0, len(sample), 16)]).astype(float)
    ref["bundle"] = model.manifest.get("version") or model.fingerprint
    return ref
