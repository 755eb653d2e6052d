"""Prefect flow `edgeqa-pipeline`: runs the DVC stages as Prefect tasks in DAG order, then `dvc push`.

The stage list comes from dvc.yaml (DVC's own graph), never hard-coded. Each task runs one
`dvc repro -s <stage>`, streams its log lines to the Prefect logger, and publishes the stage's markdown
report and metrics as artifacts. A stage must also run from plain `dvc repro` with no Prefect at all.

Two ways in:
- `edgeqa run` (and `make run`) runs it in the project folder itself.
- The deployment `edgeqa-pipeline/nightly` (`edgeqa up` applies it, on the cron schedule of
  `ops.nightly` in params.yaml) runs it with `ref`: the run clones the project at that commit into its own
  checkout under the stack's state folder, writes the run's profile and overrides into that checkout's
  params.yaml (as `dvc exp run -S`), pulls the DVC run cache from the S3 remote (so a night with nothing new
  retrains nothing), runs the stages, pushes outputs and run cache, saves the result with `dvc exp save`,
  and releases that experiment commit through the `edgeqa-release` deployment.

Only one pipeline run at a time: every run holds the Prefect global concurrency limit `edgeqa-pipeline`
(one slot) while its stages run. A second run waits up to `ops.lock_wait_s`, then fails naming the limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments.runner import RunnerDeployment
from prefect.runtime import flow_run

from edgeqa import benchrec, runs
from edgeqa.config import load_params
from edgeqa.config.profiles import apply as apply_profile
from edgeqa.config.profiles import set_keys
from edgeqa.config.schema import NightlyConfig
from edgeqa.notify import notify
from edgeqa.stack import Stack, StackConfig

LIMIT = "edgeqa-pipeline"  # the global concurrency limit (one slot) every pipeline run holds


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
    ran = False  # DVC prints "Running stage" only when it runs the command (not when skipped or restored)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        ran = ran or line.startswith("Running stage")
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
    return {"stage": stage, "seconds": round(seconds, 3), "metrics": metrics, "ran": ran}


@task(name="dvc-push", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=NO_CACHE)
def dvc_push(repo: str) -> str:
    """Push every stage output and the run cache to the S3 remote (retried: it touches the network). The run
    cache lets a fresh checkout of the same code and data restore each stage instead of rerunning it."""
    logger = get_run_logger()
    r = subprocess.run(["dvc", "push", "--run-cache"], cwd=repo, env=_dvc_env(), capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines():
        if line.strip():
            logger.info("push | %s", line)
    if r.returncode != 0:
        raise RuntimeError(f"dvc push failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "pushed"


@contextmanager
def pipeline_slot(wait_s: float) -> Iterator[None]:
    """Hold the one slot of the global concurrency limit `edgeqa-pipeline` (created here if missing) while the
    stages run; wait up to `wait_s` for it, then fail with a message that says what holds it."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(LIMIT, 1)
    acquired = False
    t0 = time.monotonic()
    try:
        with concurrency(LIMIT, occupy=1, timeout_seconds=wait_s, strict=True):
            acquired = True
            waited = time.monotonic() - t0
            if waited > 1:
                logger.info("waited %.0f s for the %s slot", waited, LIMIT)
            yield
    except TimeoutError:
        if acquired:
            raise
        raise RuntimeError(
            f"another pipeline run holds the Prefect concurrency limit {LIMIT!r} (one run at a time, so two runs "
            f"never collide on DVC's lock); waited {wait_s:.0f} s (ops.lock_wait_s). See the running "
            f"edgeqa-pipeline runs in the Prefect UI, or `prefect gcl inspect {LIMIT}`") from None


@task(name="checkout", cache_policy=NO_CACHE)
def prepare_checkout(repo: str, ref: str, profile: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's own clone of `repo` at `ref` (under the stack's state folder), its profile and overrides
    written into params.yaml, its DVC remote set, and `dvc pull --run-cache` from the S3 remote."""
    logger = get_run_logger()
    stack = Stack(StackConfig.load(Path(repo)))
    work, sha = runs.checkout(Path(repo), ref, stack.cfg.path("checkouts"))
    logger.info("checkout of %s at %s (%s): %s", repo, ref, sha[:12], work)
    changes = apply_profile(profile, work / "params.yaml", work) if profile else {}
    changes.update(set_keys(overrides, work / "params.yaml", "the run's overrides"))
    for k, (old, new) in changes.items():
        logger.info("params: %s: %r -> %r", k, old, new)
    stack.configure_dvc(work)
    r = subprocess.run(["dvc", "pull", "--run-cache", "--allow-missing"], cwd=work, env=_dvc_env(),
                       capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines()[-20:]:
        if line.strip():
            logger.info("pull | %s", line)
    if r.returncode != 0:  # nothing pulled is not an error (a first run); an unreachable remote is
        raise RuntimeError(f"dvc pull --run-cache in {work} failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
    return {"path": str(work), "commit": sha, "changes": {k: list(v) for k, v in changes.items()}}


@task(name="dvc-exp-save", cache_policy=NO_CACHE)
def save_experiment(repo: str, source: str, commit: str) -> dict[str, str]:
    """`dvc exp save`: the run as an experiment commit (the one a release names), published as an artifact."""
    name, sha = runs.exp_save(Path(repo))
    create_markdown_artifact(key="pipeline-experiment", description="the run, saved with dvc exp save", markdown=(
        f"# experiment `{name}`\n\n- commit: `{sha}`\n- on top of `{commit}` of `{source}`\n"
        f"- checkout: `{repo}`\n\n`git -C {repo} show {sha[:12]} --stat`, or `dvc exp show` there"))
    return {"name": name, "commit": sha}


@task(name="links", cache_policy=NO_CACHE)
def publish_links(repo: str) -> None:
    """Link artifacts: the GX Data Docs, the DVC remote the outputs were pushed to, the model card."""
    params = load_params(Path(repo) / "params.yaml")
    root = Path(repo)
    docs = root / params.paths.reports_dir / "validate" / "datadocs" / "index.html"
    if docs.is_file():
        create_link_artifact(key="gx-data-docs", link=docs.as_uri(), link_text="Great Expectations Data Docs",
                             description="the validation results of this run's data")
    r = subprocess.run(["dvc", "remote", "list"], cwd=repo, capture_output=True, text=True, env=_dvc_env())
    for line in r.stdout.splitlines():  # "<name>  <url>  (default)"
        fields = line.split()
        if len(fields) >= 2 and fields[1].startswith("s3://"):
            create_link_artifact(key="dvc-remote", link=fields[1], link_text=f"DVC remote {fields[0]}",
                                 description="where `dvc push` put this run's outputs and run cache")
    card = root / "models" / "edge" / "MODEL_CARD.md"
    if card.is_file():
        create_link_artifact(key="model-card", link=card.as_uri(), link_text="the edge bundle's model card")


def _name() -> str:
    p = flow_run.parameters
    repo = Path(p.get("repo", ".")).resolve()
    if p.get("ref"):
        try:
            sha = runs.commit_of(repo, p["ref"])
        except Exception:  # noqa: BLE001 - the run itself reports a bad ref; its name must not fail first
            return f"{p.get('profile') or 'params'}-{p['ref']}"
        return runs.run_name(p.get("profile") or "params", repo, sha)
    return runs.run_name(runs.profile_of(repo), repo)


@flow(name="edgeqa-pipeline", log_prints=True, flow_run_name=_name, on_completion=[notify], on_failure=[notify],
      on_crashed=[notify])
def pipeline(repo: str = ".", push: bool = True, bench_file: str | None = None, target: str | None = None,
             ref: str | None = None, profile: str | None = None, overrides: dict[str, Any] | None = None,
             release: bool = False) -> dict[str, Any]:
    """Run the DVC stages of `repo` in DAG order as Prefect tasks (all, or those `target` needs), record
    per-stage wall times, push. With `ref`: in a checkout of `repo` at `ref` of its own, with `profile` and
    `overrides` written into its params.yaml; then `dvc exp save`, and with `release` the release flow."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    root = Path(repo).resolve()
    source = root
    commit = None
    if ref is None and (profile or overrides or release):
        raise ValueError("profile, overrides and release apply to a run in its own checkout: give ref (e.g. HEAD)")
    wait_s = load_params(root / "params.yaml").ops.lock_wait_s
    with pipeline_slot(wait_s):
        if ref is not None:
            co = prepare_checkout(str(root), ref, profile, overrides or {})
            root, commit = Path(co["path"]), co["commit"]
        plan = stage_plan(root, target)
        logger.info("stages in DAG order: %s", ", ".join(name for name, _ in plan))
        results = [run_stage(name, str(root), files) for name, files in plan]
        pushed = dvc_push(str(root)) if push else "skipped"
        exp = save_experiment(str(root), str(source), commit) if commit is not None else None
    wall = time.perf_counter() - t0
    ran = [r["stage"] for r in results if r["ran"]]
    logger.info("%d of %d stages ran their command (%s); the others were unchanged or restored from the run cache",
                len(ran), len(results), ", ".join(ran) or "none")
    summary: dict[str, Any] = {"stages": results, "wall_s": round(wall, 3), "push": pushed, "repo": str(root),
                               "ran": ran, "experiment": exp}
    if bench_file:
        recs = [benchrec.record(f"stage:{r['stage']}", r["seconds"], "s", None,
                                f"edgeqa run (dvc repro -s {r['stage']})") for r in results]
        recs.append(benchrec.record("pipeline:flow_wall", wall, "s", "<= 600 s (demo profile, make run)", "edgeqa run"))
        benchrec.write(root / bench_file, recs, merge=False)
    create_table_artifact(key="pipeline-stage-times", description="wall time per stage (s); ran: DVC ran the "
                          "stage's command (else unchanged, or restored from the run cache)",
                          table=runs.summary_rows(results))
    publish_links(str(root))
    _rename_if_data_changed(root, profile, commit)
    if release and exp is not None:
        summary["release"] = start_release(str(root), exp["commit"], f"nightly {flow_run.name}")
    return summary


def _rename_if_data_changed(root: Path, profile: str | None, commit: str | None) -> None:
    """The run's name carries the data fingerprint; a run that ingested new data is renamed after it."""
    from prefect.client.orchestration import get_client

    new = runs.run_name(profile or ("params" if commit else runs.profile_of(root)), root, commit)
    if new != flow_run.name and flow_run.id:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=new)


@task(name="release", cache_policy=NO_CACHE)
def start_release(repo: str, commit: str, reason: str, wait_s: float = 3600) -> dict[str, Any]:
    """Start the `edgeqa-release` deployment for the experiment commit, and follow it until it waits for a
    reviewer or ends; its outcome (refused, unchanged, released, waiting) and run id."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    key_secret = "edgeqa-release-signing-key" if _secret_exists("edgeqa-release-signing-key") else None
    # not a subflow: the release run suspends while it waits for a reviewer, and subflows cannot
    env = {k: v for k, v in os.environ.items() if k.startswith("EDGEQA_") and k.endswith("_BUCKET")}
    fr: Any = run_deployment("edgeqa-release/edgeqa-release", timeout=0, as_subflow=False,
                             job_variables={"env": env}, parameters={
        "repo": repo, "commit": commit, "reason": reason, "key_secret": key_secret, "key_file": None})
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(fr.id)
            st = fr.state
            if st is not None and (st.is_final() or st.is_paused()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"release run {fr.id} still {st.name if st else '?'} after {wait_s:.0f} s")
            time.sleep(2.0)
    if st.is_paused():
        out = {"outcome": "waiting", "summary": "on staging; waits for a reviewer"}
    elif st.is_completed():
        out = cast(dict[str, Any], st.result())
    else:
        raise RuntimeError(f"release run {fr.name} {st.name}: {st.message}")
    logger.info("release run %s: %s: %s", fr.name, out["outcome"], out.get("summary", ""))
    return {"run_id": str(fr.id), "outcome": out["outcome"], "summary": out.get("summary", "")}


def _secret_exists(name: str) -> bool:
    from prefect.blocks.system import Secret

    try:
        Secret.load(name)
    except ValueError:
        return False
    return True


def deploy_nightly(repo: Path, work_pool: str, nightly: NightlyConfig) -> str:
    """Apply `edgeqa-pipeline/nightly` for the project at `repo`: the cron schedule and time zone of
    ops.nightly, the full DAG in a checkout of `ref`, then the release. Idempotent."""
    from prefect.schedules import Cron

    src = cast(Flow[..., Any], flow.from_source(source=str(Path(repo).resolve()),
                                                entrypoint="flows/pipeline.py:pipeline"))
    dep = cast(RunnerDeployment, src.to_deployment(
        name="nightly", work_pool_name=work_pool, schedules=[Cron(nightly.cron, timezone=nightly.timezone)],
        paused=not nightly.active,
        parameters={"repo": str(Path(repo).resolve()), "ref": nightly.ref, "profile": nightly.profile,
                    "overrides": dict(nightly.overrides), "release": nightly.release, "push": True},
        description="the full DAG in its own checkout of ops.nightly.ref (DVC run cache from S3), dvc exp save, "
                    "then edgeqa-release"))
    return str(dep.apply())
