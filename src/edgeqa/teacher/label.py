"""Stage `label`: the teacher labels the `labelled` and `unlabelled` pools.

One JSON line per image: image hash, verdict, type, location, reason, P(defective) (calibrated, with the LM's
own score beside it), the type and location distributions, top-k soft targets at each scored or generated
position, the teacher fingerprint and the prompt hash.

Resumable: batches are fixed by position in the pool, and each finished batch is written atomically to a
cache keyed by (image hashes, teacher fingerprint, prompt hash). A killed run restarts with only the missing
batches; the finished ones are reused untouched. The final output is byte-identical to an uninterrupted run's
when both use the same CPU kernels (see the README on MKL_CBWR / ATEN_CPU_CAPABILITY).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd

from edgeqa.answerer import Answerer
from edgeqa.config import LabelConfig
from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text, write_json
from edgeqa.progress import Progress
from edgeqa.report import md_table
from edgeqa_runtime.schema import PROMPT, STRICT_PROMPT, Answer, AnswerParseError

log = logging.getLogger("edgeqa.label")

# The CPU math libraries pick AVX-512 or AVX2 kernels per process, and they round differently (1e-6 in the LM's
# logits, enough to flip a near-tie greedy token). These pin them, so separate processes (a resumed run, the
# fan-out's workers) give bit-identical answers; it costs about 30 % of LM speed, so it is not the default.
PINNED_KERNELS = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def prompt_hash(layout_text: str) -> str:
    return hashlib.sha256(layout_text.encode()).hexdigest()[:16]


def answer_records(teacher: Answerer, rows: pd.DataFrame, ph: str, max_reason_tokens: int, top_k: int
                   ) -> list[dict[str, Any]]:
    """The teacher's answers for manifest rows, one record each. An answer that does not parse is asked again
    once with the stricter prompt; if it still fails it is kept, counted and reported (`parse_ok: false`)."""
    schema = teacher.schema()
    paths = list(rows.path)
    preds = teacher.predict_paths(paths, max_reason_tokens, top_k)
    retried = [i for i, pr in enumerate(preds) if _parse_error(schema, pr) is not None]
    if retried:
        log.info("retrying %d answers that did not parse, with the stricter prompt", len(retried))
        again = teacher.predict_paths([paths[i] for i in retried], max_reason_tokens, top_k, strict=True)
        for i, pr in zip(retried, again):
            preds[i] = pr
    out = []
    for j, ((_, row), pr) in enumerate(zip(rows.iterrows(), preds)):
        a = pr["answer"]
        why = _parse_error(schema, pr)
        rec: dict[str, Any] = {"sha256": row.sha256, "path": row.path, "split": row.split,
                               "teacher": teacher.fingerprint, "prompt_hash": ph,
                               "parse_ok": why is None, "parse_error": why, "retried": j in retried,
                               "verdict": a["verdict"], "type": a["defect_type"], "location": a["location"],
                               "reason": a["reason"]}
        rec.update({k: v for k, v in pr.items() if k != "answer"})
        out.append(rec)
    return out


def plan(cfg: LabelConfig, manifest: Path) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """The pools' rows in manifest order, and their batches: fixed by position, so every process (a resumed
    run, a fan-out worker) cuts the same batches and finds the same cache keys."""
    df = pd.read_parquet(manifest)
    pool = df[df.split.isin(cfg.pools)].reset_index(drop=True)
    if pool.empty:
        raise StageError(f"label: no images in the pools {cfg.pools} of {manifest}")
    bs = cfg.batch_size
    return pool, [pool.iloc[i:i + bs] for i in range(0, len(pool), bs)]


def batch_key(rows: pd.DataFrame) -> str:
    return hashlib.sha256("".join(rows.sha256).encode()).hexdigest()[:20]


def cache_dir(teacher: Answerer, out: Path) -> tuple[str, Path]:
    """The prompt hash and the cache folder of this teacher and prompt under the stage's output `out`."""
    ph = prompt_hash(PROMPT + STRICT_PROMPT + repr(teacher.schema().options()))
    cache = out / "cache" / f"{teacher.fingerprint}-{ph}"
    cache.mkdir(parents=True, exist_ok=True)
    return ph, cache


def _compute(teacher: Answerer, rows: pd.DataFrame, ph: str, max_reason_tokens: int, top_k: int, f: Path
             ) -> list[str]:
    lines = [json.dumps(r, sort_keys=True) for r in answer_records(teacher, rows, ph, max_reason_tokens, top_k)]
    atomic_write_text(f, "\n".join(lines) + "\n")  # temp name, then rename: a reader never sees half a batch
    return lines


def shard_batches(n_batches: int, shards: int) -> list[range]:
    """Batch indices cut into `shards` contiguous runs of whole batches, sizes differing by at most one."""
    if shards < 1:
        raise StageError(f"label fan-out: shards must be >= 1, got {shards}")
    q, r = divmod(n_batches, shards)
    out, start = [], 0
    for i in range(shards):
        end = start + q + (i < r)
        out.append(range(start, end))
        start = end
    return out


def fill(cfg: LabelConfig, max_reason_tokens: int, top_k: int, threads: int, teacher_dir: Path, manifest: Path,
         out: Path, shard: int, shards: int) -> dict[str, Any]:
    """Fill the stage's own resume cache for shard `shard` of `shards` (a run of whole batches): the batches
    not cached yet are computed and written exactly as the stage writes them; `label` then assembles
    labels.jsonl from the cache. Used by the Dask fan-out flow (flows/label_fanout.py)."""
    from edgeqa.teacher.local import load_teacher

    t0 = time.perf_counter()
    _, batches = plan(cfg, manifest)
    mine = shard_batches(len(batches), shards)[shard]
    teacher = load_teacher(teacher_dir, threads)
    ph, cache = cache_dir(teacher, out)
    computed = reused = 0
    prog = Progress(log, f"label shard {shard + 1}/{shards}", sum(len(batches[i]) for i in mine), "images")
    done = 0
    for i in mine:
        f = cache / f"{batch_key(batches[i])}.jsonl"
        if f.exists():
            read_cache_entry(f, batches[i], teacher.fingerprint, ph)  # a foreign or cut entry stops here too
            reused += 1
        else:
            _compute(teacher, batches[i], ph, max_reason_tokens, top_k, f)
            computed += 1
        done += len(batches[i])
        prog.update(done, cached_batches=reused)
    return {"shard": shard, "batches": [mine.start, mine.stop], "computed": computed, "reused": reused,
            "images": done, "seconds": round(time.perf_counter() - t0, 2), "cache": str(cache)}


def _parse_error(schema: Any, pr: dict[str, Any]) -> str | None:
    """Why a prediction's answer does not read back through the strict parser (None: it does)."""
    if pr.get("raw_error"):
        return str(pr["raw_error"])
    try:
        schema.parse(schema.format(Answer(**pr["answer"])))
    except AnswerParseError as exc:
        return exc.why
    return None


def read_cache_entry(f: Path, rows: pd.DataFrame, fingerprint: str, ph: str) -> list[str]:
    """A cached batch's lines, after checking they are this batch's answers from this teacher and prompt: one
    JSON record per image, in the batch's order, with the teacher fingerprint and prompt hash of this run.
    Anything else (truncated, edited, another teacher's) is refused, naming the file and the first fault."""
    lines = f.read_text().splitlines()
    fix = f"; delete {f} (or the whole cache folder) and rerun label"
    if len(lines) != len(rows):
        raise StageError(f"label cache {f}: {len(lines)} records for a batch of {len(rows)} images{fix}")
    for n, (line, sha) in enumerate(zip(lines, rows.sha256), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(f"label cache {f}: line {n} is not JSON ({exc}){fix}") from None
        if not isinstance(r, dict):
            raise StageError(f"label cache {f}: line {n} is not a label record{fix}")
        for key, want in (("sha256", sha), ("teacher", fingerprint), ("prompt_hash", ph)):
            if r.get(key) != want:
                raise StageError(f"label cache {f}: line {n} has {key} {r.get(key)!r}, expected {want!r}{fix}")
    return lines


def run(cfg: LabelConfig, max_reason_tokens: int, top_k: int, threads: int, teacher_dir: Path, manifest: Path,
        out: Path, metrics: Path | None = None, report: Path | None = None) -> dict[str, Any]:
    """The teacher in `teacher_dir` labels the pools `cfg.pools` of `manifest`, batch by batch through the
    resume cache, into `out/labels.jsonl`. Generation: `max_reason_tokens` per reason, `top_k` soft targets."""
    from edgeqa.teacher.local import load_teacher

    t0 = time.perf_counter()
    pool, batches = plan(cfg, manifest)
    teacher = load_teacher(teacher_dir, threads)
    ph, cache = cache_dir(teacher, out)
    bs = cfg.batch_size
    reused = computed = 0
    t_pred = 0.0
    prog = Progress(log, "label", len(pool), "images")
    records: list[str] = []
    for b in batches:
        f = cache / f"{batch_key(b)}.jsonl"
        if f.exists():
            records += read_cache_entry(f, b, teacher.fingerprint, ph)
            reused += 1
        else:
            t1 = time.perf_counter()
            records += _compute(teacher, b, ph, max_reason_tokens, top_k, f)
            t_pred += time.perf_counter() - t1
            computed += 1
        prog.update(len(records), cached_batches=reused)
    atomic_write_text(out / "labels.jsonl", "\n".join(records) + "\n")
    for other in (out / "cache").iterdir():  # caches of other teachers or prompts can never be reused
        if other != cache:
            shutil.rmtree(other, ignore_errors=True)
    recs = [json.loads(r) for r in records]
    fails = [r for r in recs if not r["parse_ok"]]
    n_new = computed * bs
    dt = time.perf_counter() - t0
    res = {"images": len(recs), "defective": sum(r["verdict"] == "defective" for r in recs),
           "parse_failures": len(fails), "parse_rate": 1 - len(fails) / len(recs),
           "batches_computed": computed, "batches_reused": reused, "seconds": round(dt, 2),
           "images_per_s_predict": round(min(n_new, len(recs)) / t_pred, 2) if t_pred else None,
           "generated_tokens_per_image": round(sum(r["generated_tokens"] for r in recs) / len(recs), 2),
           "teacher_fingerprint": teacher.fingerprint, "prompt_hash": ph,
           "teacher_parameters": teacher.parameters(), "usage": teacher.usage()}
    if metrics:
        write_json(metrics, res)
    if report:
        body = (f"# label\n\n{len(recs)} images of the pools {cfg.pools} labelled by teacher "
                f"`{teacher.fingerprint}` (prompt `{ph}`) in {res['seconds']} s; {computed} batches computed, "
                f"{reused} reused from the cache.\n\n"
                + md_table(["figure", "value"], [[k, v] for k, v in res.items()]))
        if fails:
            body += "\n\nAnswers that did not parse:\n\n" + md_table(
                ["image", "why", "reason text"], [[r["path"], r["parse_error"], r["reason"]] for r in fails[:20]])
        atomic_write_text(report, body + "\n")
    log.info("label: %s", res)
    return res
