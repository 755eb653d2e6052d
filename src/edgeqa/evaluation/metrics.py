"""Evaluation metrics shared by every model: the `evaluate` stage computes them, reports only show them.

All functions are pure (numpy / scikit-learn). A metric the data cannot support (no defective images, no
types, no masks, one class only) is None, shown as n/a, never 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgeqa.config import GRID_WORDS

# Longest first, so "upper left" is found as itself, never as "left".
_GRID_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, GRID_WORDS), key=len, reverse=True)) + r")\b")
_REGIONS_RE = re.compile(r"\b(one|\d+) regions?\b")
_ORIENT_RE = re.compile(r"\b(horizontal|vertical|diagonal)(?:ly)?\b")
_POLARITY = {"darker": re.compile(r"\bdarker\b"), "brighter": re.compile(r"\bbrighter\b"),
             "similar": re.compile(r"\bsimilar in tone\b")}


def auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def verdict_metrics(y: np.ndarray, pred: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """y, pred: 1 = defective. Miss rate: defective called good. Overkill rate: good called defective."""
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    n_def, n_good = int(y.sum()), int((1 - y).sum())
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    f1 = None if n_def == 0 else (2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"verdict_accuracy": float((pred == y).mean()) if len(y) else None, "verdict_f1": f1,
            "auroc": auroc(y, p), "miss_rate": fn / n_def if n_def else None,
            "overkill_rate": fp / n_good if n_good else None}


def class_accuracy(truth: Sequence[str], pred: Sequence[str | None], classes: Sequence[str]
                   ) -> dict[str, Any]:
    """Accuracy, macro accuracy (mean of per-class recall over the classes present) and per class."""
    if not truth or not classes:
        return {"accuracy": None, "macro": None, "per_class": {}}
    t, q = np.asarray(truth, dtype=object), np.asarray(pred, dtype=object)
    per = {c: float((q[t == c] == c).mean()) for c in classes if (t == c).any()}
    return {"accuracy": float((t == q).mean()), "macro": float(np.mean(list(per.values()))) if per else None,
            "per_class": per}


def grid_words_in(text: str) -> set[str]:
    return set(_GRID_RE.findall(text.lower()))


def _mentions(reason: str, defect_type: str) -> bool:
    return re.search(r"\b" + re.escape(defect_type.replace("_", " ").lower()) + r"\b", reason.lower()) is not None


def names_type(reason: str, defect_type: str, types: Sequence[str] = ()) -> bool:
    """The reason names this type and no other of `types`: a good-image reason that lists every type it did
    not find ("with no crack, hole or stain") names none of them."""
    return _mentions(reason, defect_type) and not any(_mentions(reason, t) for t in types if t != defect_type)


def reason_agrees(verdict: str | None, defect_type: str | None, location: str | None, reason: str,
                  types: Sequence[str]) -> bool:
    """The reason says what the answer's own fields say. A defective answer's reason names its type (and no
    other of `types`) and its location word; a good answer's reason pins no single defect type on the image.
    Judged against the answer, not the truth: a reason that contradicts its own verdict misleads whoever reads
    it, right or wrong."""
    if verdict == "defective":
        ok_type = defect_type is None or not types or names_type(reason, defect_type, types)
        ok_loc = location is None or location in grid_words_in(reason)
        return ok_type and ok_loc
    return not any(names_type(reason, t, types) for t in types)


def stated_attributes(reason: str, size_classes: Sequence[str]) -> dict[str, str]:
    """The mask attributes a reason states, in the words of the reference reasons (edgeqa.data.maskfacts)."""
    r = reason.lower()
    out: dict[str, str] = {}
    sizes = [s for s in size_classes if re.search(r"\b" + re.escape(s.lower()) + r"\b", r)]
    if len(sizes) == 1:
        out["size_class"] = sizes[0]
    m = _REGIONS_RE.search(r)
    if m:
        out["n_regions"] = "1" if m[1] == "one" else m[1]
    m = _ORIENT_RE.search(r)
    if m:
        out["orientation"] = m[1]
    elif re.search(r"\bcompact\b", r):
        out["orientation"] = "none"
    pol = [k for k, rx in _POLARITY.items() if rx.search(r)]
    if len(pol) == 1:
        out["polarity"] = pol[0]
    return out


def attribute_accuracy(reasons: Sequence[str], truths: Sequence[Mapping[str, str]],
                       size_classes: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """Per attribute: how often the reason states it, and how often a stated value is right."""
    out: dict[str, dict[str, float | int | None]] = {}
    for attr in ("size_class", "n_regions", "orientation", "polarity"):
        stated = right = 0
        for reason, truth in zip(reasons, truths):
            got = stated_attributes(reason, size_classes).get(attr)
            if got is not None:
                stated += 1
                right += got == truth[attr]
        n = len(reasons)
        out[attr] = {"n": n, "stated_rate": stated / n if n else None,
                     "accuracy_when_stated": right / stated if stated else None}
    return out


def roc_points(y: np.ndarray, s: np.ndarray) -> list[dict[str, float]]:
    from sklearn.metrics import roc_curve

    if auroc(y, s) is None:
        return []
    fpr, tpr, thr = roc_curve(np.asarray(y).astype(int), s)
    return [{"fpr": round(float(a), 6), "tpr": round(float(b), 6), "threshold": round(float(min(t, 1e9)), 6)}
            for a, b, t in zip(fpr, tpr, thr)]


def bootstrap_delta_auroc(y: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, n: int, seed: int
                          ) -> dict[str, float | int | None]:
    """AUROC(b) - AUROC(a) on the same images, with a paired percentile bootstrap 95 % interval."""
    y = np.asarray(y).astype(int)
    a, b = auroc(y, s_a), auroc(y, s_b)
    if a is None or b is None:
        return {"auroc_a": a, "auroc_b": b, "delta": None, "ci_low": None, "ci_high": None, "resamples": 0}
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            deltas.append(auroc(y[i], s_b[i]) - auroc(y[i], s_a[i]))  # type: ignore[operator]
    lo, hi = (np.percentile(deltas, [2.5, 97.5]) if deltas else (np.nan, np.nan))
    return {"auroc_a": a, "auroc_b": b, "delta": b - a, "ci_low": float(lo), "ci_high": float(hi),
            "resamples": len(deltas)}


def agreement(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """How often two models give the same verdict, and the same closed fields (verdict, type, location)."""
    if not a:
        return {"verdict": None, "closed_fields": None}
    v = [x["verdict"] == y["verdict"] for x, y in zip(a, b)]
    c = [(x["verdict"], x["type"], x["location"]) == (y["verdict"], y["type"], y["location"]) for x, y in zip(a, b)]
    return {"verdict": float(np.mean(v)), "closed_fields": float(np.mean(c))}
