"""Drift: the answers the line sent back (prediction logs under feedback/) against what the released model
answered on the `test` split (`evaluate@edge`), and the image sizes the manifest recorded for training.

Three rules (thresholds in `ops.drift`):
- the population stability index (PSI) of P(defective), over 10 quantile bins of the test split's scores;
- the share of images answered defective, against the test split's share;
- the share of images whose size (width × height) no training image had (a new camera or crop).

A batch smaller than `ops.drift.min_batch` gets no verdict. Not compared yet: image brightness statistics and
the mean image embedding (the log does not carry them).
"""

from __future__ import annotations

import datetime as dt
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


def check(cfg: DriftConfig, reference: list[dict[str, Any]], training_sizes: set[tuple[int, int]],
          batch: list[dict[str, Any]]) -> dict[str, Any]:
    """The drift report: each rule's value, threshold and verdict; `drifted` when any rule fails."""
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
    out["defect_rate"] = {"reference": round(rate_ref, 4), "batch": round(rate_new, 4)}
    out["ks_p_defective"] = {k: round(float(v), 4) for k, v in zip(("statistic", "pvalue"), ks_2samp(p_ref, p_new))}
    failed = [r for r in out["rules"] if not r["passed"]]
    out["drifted"] = bool(failed)
    out["summary"] = ("drift: " + "; ".join(f"{r['rule']} {r['value']} > {r['max']}" for r in failed) if failed
                      else f"no drift in {len(batch)} answers (every rule within its threshold)")
    return out


def render(rep: dict[str, Any]) -> str:
    lines = [f"# drift: {'DRIFT' if rep['drifted'] else 'none' if rep['drifted'] is False else 'no verdict'}", "",
             rep["summary"], "", f"- answers: {rep['n']} (bundles {', '.join(rep['bundles']) or '-'}); "
             f"reference: {rep['n_reference']} test answers of evaluate@edge", ""]
    if rep["rules"]:
        lines += ["| rule | value | max | passed |", "|---|---|---|---|"]
        lines += [f"| {r['rule']} | {r['value']} | {r['max']} | {'yes' if r['passed'] else 'NO'} |"
                  for r in rep["rules"]]
        lines += ["", f"KS test of P(defective): {rep['ks_p_defective']}"]
    return "\n".join(lines) + "\n"
