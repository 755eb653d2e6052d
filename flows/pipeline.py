"""Prefect flow `edgeqa-pipeline`: runs the DVC stages as Prefect tasks in DAG order, then `dvc push`.

The stage list comes from dvc.yaml (DVC's own graph), never hard-coded. Each task runs one
`dvc repro -s <stage>`, streams its log lines to the Prefect logger, and publishes the stage's markdown
report and metrics as artifacts. A stage must also run from plain `dvc repro` with no Prefect at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from edgeqa import benchrec


def _dvc_env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1"}


def stage_plan(repo: Path, target: str | None = None) -> list[tuple[str, dict[str, list[str]]]]:
    """Stages in dependency order (foreach entries as `name@key`), each with the markdown reports and metrics
    files it declares in dvc.yaml. One read of DVC's own graph. With `target`, only that stage and the
    stages it depends on (what `dvc repro <target>` would consider)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(repo)) as r:
        graph = r.index.graph  # edges point from a stage to the stages it depends on
        nodes = [s for s in graph.nodes if isinstance(s, PipelineStage)]
        if target is not None:
            match = [s for s in nodes if s.name == target]
            if not match:
                raise ValueError(f"unknown stage {target!r}; stages in dvc.yaml: {sorted(s.name for s in nodes)}")
            keep = {match[0], *nx.descendants(graph, match[0])}
            nodes = [s for s in nodes if s in keep]
        sub = graph.subgraph(nodes)
        order = nx.lexicographical_topological_sort(sub.reverse(copy=True), key=lambda s: s.name)
        return [(s.name, {"reports": [str(o.def_path) for o in s.outs if str(o.def_path).endswith(".md")],
                          "metrics": [str(o.def_path) for o in s.outs if o.metric]}) for s in order]


def dag_stages(repo: Path, target: str | None = None) -> list[str]:
    return [name for name, _ in stage_plan(repo, target)]


def _artifact_key(stage: str, kind: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in f"{stage}-{kind}".lower())


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE)
def run_stage(stage: str, repo: str, files: dict[str, list[str]]) -> dict[str, Any]:
    """`dvc repro -s <stage>`, with its output streamed to the Prefect log; then publish report and metrics."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro", "--single-item", stage], cwd=repo, env=_dvc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            logger.info("%s | %s", stage, line)
            tail = (tail + [line])[-30:]
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"stage {stage} failed (dvc repro exit {rc}); last lines:\n" + "\n".join(tail))
    metrics: dict[str, Any] = {}
    for m in files.get("metrics", []):
        p = Path(repo) / m
        if p.exists():
            metrics.update(json.loads(p.read_text()))
    for rpt in files.get("reports", []):
        p = Path(repo) / rpt
        if p.exists():
            create_markdown_artifact(key=_artifact_key(stage, "report"), markdown=p.read_text(),
                                     description=f"{stage}: {rpt}")
    if metrics:
        create_table_artifact(key=_artifact_key(stage, "metrics"), description=f"{stage} metrics",
                              table=[{"metric": k, "value": json.dumps(v) if isinstance(v, (dict, list)) else v}
                                     for k, v in sorted(metrics.items())])
    return {"stage": stage, "seconds": round(seconds, 3), "metrics": metrics}


@task(name="dvc-push", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=NO_CACHE)
def dvc_push(repo: str) -> str:
    """Push every stage output to the S3 remote (retried: it touches the network)."""
    logger = get_run_logger()
    r = subprocess.run(["dvc", "push"], cwd=repo, env=_dvc_env(), capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines():
        if line.strip():
            logger.info("push | %s", line)
    if r.returncode != 0:
        raise RuntimeError(f"dvc push failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "pushed"


@flow(name="edgeqa-pipeline", log_prints=True)
def pipeline(repo: str = ".", push: bool = True, bench_file: str | None = None,
             target: str | None = None) -> dict[str, Any]:
    """Run the DVC stages of `repo` in DAG order as Prefect tasks (all, or those `target` needs), record
    per-stage wall times, push."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    root = Path(repo).resolve()
    plan = stage_plan(root, target)
    logger.info("stages in DAG order: %s", ", ".join(name for name, _ in plan))
    results = [run_stage(name, str(root), files) for name, files in plan]
    pushed = dvc_push(str(root)) if push else "skipped"
    wall = time.perf_counter() - t0
    summary = {"stages": results, "wall_s": round(wall, 3), "push": pushed}
    if bench_file:
        recs = [benchrec.record(f"stage:{r['stage']}", r["seconds"], "s", None,
                                f"edgeqa run (dvc repro -s {r['stage']})") for r in results]
        recs.append(benchrec.record("pipeline:flow_wall", wall, "s", "<= 600 s (demo profile, make run)", "edgeqa run"))
        benchrec.write(root / bench_file, recs, merge=False)
    create_table_artifact(key="pipeline-stage-times", description="wall time per stage (s)",
                          table=[{"stage": r["stage"], "seconds": r["seconds"]} for r in results])
    return summary
