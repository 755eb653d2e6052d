"""Prefect flow `edgeqa-label-fanout`: the `label` stage's work spread over Dask workers.

A large unlabelled pool is the one stage that outgrows a machine first. This flow does not re-implement the
stage: the Dask workers (prefect-dask's `DaskTaskRunner`, on a local cluster or an existing scheduler) fill
the stage's own per-batch resume cache, each worker a contiguous run of whole batches. `dvc repro -s label`
then runs the stage as always; it finds every batch cached and assembles `labels.jsonl`, so DVC records the
output, its hash and the run cache exactly as for a single-process run.

The teacher on disk must be the one DVC would label with: the flow refuses to start while `label`'s upstream
stages are stale (`dvc status`), and names them.

For answers identical to a single-process run, the workers run one thread each; `pin_kernels` (default on)
pins MKL, ATen and oneDNN to their AVX2 kernels in the workers, as the README explains for `label`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from edgeqa.config import load_params
from edgeqa.teacher import label
from flows.pipeline import LIMIT, _dvc_env, pipeline_slot, run_stage, stage_plan


@task(name="label-shard", task_run_name="label-shard-{shard}", cache_policy=NO_CACHE)
def label_shard(params_file: str, teacher_dir: str, manifest: str, out: str, shard: int, shards: int,
                threads: int, cwd: str) -> dict[str, Any]:
    p = load_params(Path(params_file))
    # in the project folder, as the stage runs: the teacher names its base LM relative to it. A worker runs
    # one task at a time (one thread), so the change of folder is this task's alone.
    with contextlib.chdir(cwd):
        return label.fill(p.label, p.teacher.max_reason_tokens, p.teacher.top_k, threads, Path(teacher_dir),
                          Path(manifest), Path(out), shard, shards)


@flow(name="edgeqa-label-cache", log_prints=True)
def fill_label_cache(params_file: str, teacher_dir: str, manifest: str, out: str, shards: int,
                     threads: int = 1, cwd: str | None = None) -> list[dict[str, Any]]:
    """One `label-shard` task per shard on this flow's task runner (the caller gives it a DaskTaskRunner);
    relative paths are read from `cwd` (default: this process's folder)."""
    here = cwd or os.getcwd()
    futures = [label_shard.submit(params_file, teacher_dir, manifest, out, i, shards, threads, here)
               for i in range(shards)]
    return [f.result() for f in futures]


def dask_runner(workers: int, address: str | None = None) -> Any:
    """prefect-dask's task runner: an existing scheduler at `address`, or a LocalCluster of `workers`
    processes with one thread each, bound to loopback and without a dashboard port."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        "dashboard_address": None})


def worker_environ(pin_kernels: bool = True) -> dict[str, Any]:
    """The environment the local workers start with (Dask's `distributed.nanny.pre-spawn-environ`, set before
    the interpreter starts, so torch sees it at import): one thread, offline, and pinned kernels if asked."""
    import dask
    import distributed  # noqa: F401 - loads Dask's distributed defaults, which the setting below must extend

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.update({"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "HF_HUB_OFFLINE": "1"})
    if pin_kernels:
        env.update(label.PINNED_KERNELS)
    return env


def fill_with_dask(params_file: str, teacher_dir: str, manifest: str, out: str, workers: int,
                   address: str | None = None, pin_kernels: bool = True, cwd: str | None = None
                   ) -> list[dict[str, Any]]:
    """`fill_label_cache` with `workers` shards on a Dask task runner (a local cluster unless `address`)."""
    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ(pin_kernels)}):
        return fill_label_cache.with_options(task_runner=dask_runner(workers, address))(
            params_file, teacher_dir, manifest, out, shards=workers, threads=1, cwd=cwd)


def _stale_upstream(repo: Path) -> list[str]:
    """Stages `label` depends on that DVC would rerun (their outputs would change the teacher or the data)."""
    r = subprocess.run(["dvc", "status", "--json", "--with-deps", "label"], cwd=repo, capture_output=True,
                       text=True, env=_dvc_env())
    if r.returncode != 0:
        raise RuntimeError(f"dvc status label in {repo} failed: {r.stderr.strip()[-1500:]}")
    stale = json.loads(r.stdout or "{}")
    return sorted(s for s in stale if s != "label" and not s.endswith(".dvc"))


@flow(name="edgeqa-label-fanout", log_prints=True)
def label_fanout(repo: str = ".", workers: int = 2, address: str | None = None, pin_kernels: bool = True,
                 assemble: bool = True) -> dict[str, Any]:
    """Fill `label`'s cache over `workers` Dask workers, then `dvc repro -s label` assembles the output."""
    logger = get_run_logger()
    root = Path(repo).resolve()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    stale = _stale_upstream(root)
    if stale:
        raise RuntimeError(f"label's upstream stages are stale: {', '.join(stale)}. The fan-out labels with the "
                           f"teacher on disk, so run them first: dvc repro {' '.join(stale)} (or `edgeqa run`)")
    p = load_params(root / "params.yaml")
    paths = p.paths
    args = {"params_file": str(root / "params.yaml"), "teacher_dir": str(root / paths.model_dir("teacher")),
            "manifest": str(root / paths.ingest_dir / "manifest.parquet"), "out": str(root / paths.labels_dir)}
    with pipeline_slot(p.ops.lock_wait_s):  # never beside a pipeline run on the same DVC lock and outputs
        shards = fill_with_dask(**args, workers=workers, address=address, pin_kernels=pin_kernels, cwd=str(root))
        create_table_artifact(key="label-fanout-shards", table=[{k: v for k, v in s.items() if k != "cache"}
                                                                for s in shards],
                              description=f"label cache filled by {workers} Dask workers ({LIMIT} held)")
        logger.info("shards: %s", shards)
        result: dict[str, Any] = {"shards": shards}
        if assemble:  # the pipeline's own stage task: log streamed, report and metrics published as artifacts
            files = dict(stage_plan(root, "label"))["label"]
            result["label"] = run_stage("label", str(root), files)["metrics"]
    return result
