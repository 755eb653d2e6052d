"""Champion/challenger and latency for the `edgeqa-release` flow. Never cached: what is in production now, and
this machine's CPU, are outside DVC's view, so a cached answer would lie.

The candidate release and the production bundle answer the same test images in one run, image by image and
interleaved (alternating which goes first), so both see the same machine. Test images in either bundle's
training lineage (`training_images.txt`, SHA-256 per line) are left out: new data moves the split, and a
model must not be scored on an image it learned from. The rules are `release.challenger` in params.yaml.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from edgeqa.config import ChallengerRules
from edgeqa.errors import StageError
from edgeqa.evaluation import metrics as M
from edgeqa.report import fmt, md_table

log = logging.getLogger("edgeqa.release")
TRAINING_IMAGES = "training_images.txt"


def write_training_images(folder: Path, manifest: Path, eval_split: str) -> int:
    """Every image of the dataset version outside the evaluation split: what the models could learn from."""
    df = pd.read_parquet(manifest, columns=["sha256", "split"])
    hashes = sorted(set(df.sha256[df.split != eval_split]))
    (Path(folder) / TRAINING_IMAGES).write_text("".join(f"{h}\n" for h in hashes))
    return len(hashes)


def training_images(folder: Path) -> set[str] | None:
    f = Path(folder) / TRAINING_IMAGES
    return set(f.read_text().split()) if f.is_file() else None


def cpu_flags() -> str:
    """The CPU model and the vector extensions that change kernel speed (recorded with every latency)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"))
    return f"{model} ({' '.join(keep) or 'no avx2'})"


def _answer_interleaved(models: dict[str, Any], rows: pd.DataFrame, max_reason_tokens: int
                        ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[float]]]:
    from edgeqa.teacher.label import answer_records, prompt_hash
    from edgeqa_runtime.schema import PROMPT, STRICT_PROMPT

    names = list(models)
    recs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    ms: dict[str, list[float]] = {n: [] for n in names}
    phs = {n: prompt_hash(PROMPT + STRICT_PROMPT + repr(m.schema().options())) for n, m in models.items()}
    for i in range(len(rows)):
        for n in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            recs[n] += answer_records(models[n], rows.iloc[i:i + 1], phs[n], max_reason_tokens, 1)
            ms[n].append((time.perf_counter() - t0) * 1000)
    return recs, ms


def compare(rules: ChallengerRules, candidate: Path, champion: Path | None, champion_version: str | None,
            manifest: Path, split: str, size_classes: list[str], threads: int, max_reason_tokens: int,
            bootstrap: int = 1000, seed: int = 0, root: Path | None = None) -> dict[str, Any]:
    """The candidate against the champion (or alone, when nothing is in production) on the comparable
    `split` images; each rule with its value and threshold, and `passed`. Relative image paths in the
    manifest are under `root` (the project; default: the current folder, as for a DVC stage)."""
    from edgeqa.evaluation.evaluate import compute, load_answerer

    df = pd.read_parquet(manifest)
    if root is not None:
        df["path"] = [p if Path(p).is_absolute() else str(Path(root) / p) for p in df.path]
    rows = df[df.split == split].reset_index(drop=True)
    if rows.empty:
        raise StageError(f"champion/challenger: no images in split {split!r} of {manifest}")
    excluded: dict[str, int] = {}
    lineage_known: dict[str, bool] = {}
    for name, folder in (("candidate", candidate), ("champion", champion)):
        if folder is None:
            continue
        seen = training_images(folder)
        lineage_known[name] = seen is not None
        if seen:
            seen_here = rows.sha256.isin(seen)
            excluded[name] = int(seen_here.sum())
            rows = rows[~seen_here].reset_index(drop=True)
    if rows.empty or rows.label.nunique() < 2:
        raise StageError(f"champion/challenger: after leaving out images in either bundle's training lineage "
                         f"({excluded}), the {split} split has {len(rows)} images and not both labels: no fair "
                         "comparison is possible")
    models = {"candidate": load_answerer(Path(candidate), threads)}
    if champion is not None:
        models["champion"] = load_answerer(Path(champion), threads)
    types = tuple(models["candidate"].schema().types)
    recs, ms = _answer_interleaved(models, rows, max_reason_tokens)
    res: dict[str, Any] = {"champion": champion_version, "split": split, "images": len(rows),
                           "defective": int((rows.label == "defective").sum()), "excluded_by_lineage": excluded,
                           "lineage_known": lineage_known, "cpu": cpu_flags(), "threads": threads, "models": {}}
    for n in models:
        m = compute(rows, recs[n], types, size_classes, None, 0, seed)
        lat = np.array(ms[n])
        res["models"][n] = {"auroc": m["auroc"], "type_accuracy": m["type_accuracy"],
                            "miss_rate": m.get("miss_rate"), "overkill_rate": m.get("overkill_rate"),
                            "parse_rate": m["parse_rate"], "latency_ms_median": float(np.median(lat)),
                            "latency_ms_p90": float(np.percentile(lat, 90))}
    c = res["models"]["candidate"]
    rows_out: list[dict[str, Any]] = []
    if champion is None:
        res.update(passed=True, rules=rows_out, summary=f"no champion: nothing is in production yet, so the "
                   f"candidate is compared with nothing (its latency here: {c['latency_ms_median']:.1f} ms median)")
        return res
    ch = res["models"]["champion"]
    y = (rows.label == "defective").to_numpy().astype(int)
    p = {n: np.array([r["p_defective"] for r in recs[n]], dtype=float) for n in models}
    res["delta_auroc"] = M.bootstrap_delta_auroc(y, p["champion"], p["candidate"], bootstrap, seed)

    def drop(key: str) -> float | None:
        return None if ch[key] is None or c[key] is None else ch[key] - c[key]

    for rule, what, value, limit in (
            ("max_auroc_drop", "champion AUROC - candidate AUROC", drop("auroc"), rules.max_auroc_drop),
            ("max_type_accuracy_drop", "champion type accuracy - candidate type accuracy", drop("type_accuracy"),
             rules.max_type_accuracy_drop),
            ("max_latency_ratio", "candidate / champion median latency, interleaved on this CPU",
             c["latency_ms_median"] / ch["latency_ms_median"], rules.max_latency_ratio)):
        rows_out.append({"rule": rule, "what": what, "value": value, "op": "<=", "threshold": limit,
                         "passed": value is not None and value <= limit})
    bad = [r for r in rows_out if not r["passed"]]
    res.update(passed=not bad, rules=rows_out, summary=(
        f"the candidate holds against champion {champion_version}" if not bad else
        "refused against champion " + str(champion_version) + ": " + "; ".join(
            f"{r['rule']} ({r['what']}: {fmt(r['value'])}, allowed <= {fmt(r['threshold'])})" for r in bad)))
    return res


def render(res: dict[str, Any]) -> str:
    lines = [f"# champion/challenger: {'passed' if res['passed'] else 'REFUSED'}", "", res["summary"], "",
             f"{res['images']} {res['split']} images ({res['defective']} defective); left out as in a training "
             f"lineage: {res['excluded_by_lineage'] or 'none'}; lineage known: {res['lineage_known']}. "
             f"Latency measured here, interleaved, {res['threads']} thread(s), on {res['cpu']}.", ""]
    keys = ["auroc", "type_accuracy", "miss_rate", "overkill_rate", "parse_rate", "latency_ms_median",
            "latency_ms_p90"]
    lines += [md_table(["model", *keys], [[n, *(fmt(m[k]) for k in keys)] for n, m in res["models"].items()]), ""]
    if res.get("delta_auroc"):
        d = res["delta_auroc"]
        lines += [f"ΔAUROC candidate − champion {fmt(d['delta'])}, paired bootstrap 95 % CI "
                  f"[{fmt(d['ci_low'])}, {fmt(d['ci_high'])}] ({d['resamples']} resamples).", ""]
    if res["rules"]:
        lines += [md_table(["rule", "value of", "value", "allowed", "result"],
                           [[r["rule"], r["what"], fmt(r["value"]), f"<= {fmt(r['threshold'])}",
                             "pass" if r["passed"] else "**FAIL**"] for r in res["rules"]]), ""]
    return "\n".join(lines)
