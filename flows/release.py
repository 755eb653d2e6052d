"""Prefect flow `edgeqa-release`: the gate's report -> the signed release bundle (model card, lineage,
version) -> champion/challenger and latency against what is in production now -> publish to the S3 registry
-> `staging` -> wait for a reviewer -> `production`.

It runs as the deployment `edgeqa-release/edgeqa-release` on the local process work pool (`edgeqa up` starts
the worker; `edgeqa release` applies the deployment and starts a run). The wait is `suspend_flow_run` with a
typed input (`ReviewerDecision`): the run leaves the worker while it waits, the Prefect UI shows the form,
and `edgeqa approve|reject VERSION` sends a decision signed with the reviewer's key. The form takes a one-time
token instead (`edgeqa approval-token`). A decision that fails its check (wrong key or token, not on the
allow-list) is refused, logged and kept under `refusals/` in the registry, and the run waits again. The wait
ends at `release.approval_timeout_s`: Prefect fails the run then, and the registry refuses a late decision,
so a timeout counts as a rejection.

Resuming re-runs this function from the top; every task uses the cache policy RUN (inputs + source + this
run's id), so a resumed run reuses what it did before it was suspended and never repeats a side effect. Across
runs nothing is cached: production and this CPU are outside DVC.

A refusal (the gate, or the champion) is an outcome, not a crash: the flow completes with `outcome: refused`
and a summary naming the rule, its value and its threshold; nothing leaves the candidate area. A candidate
already on staging or production creates no new version and no request.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal, cast

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.blocks.system import Secret
from prefect.cache_policies import INPUTS, RUN_ID, TASK_SOURCE
from prefect.deployments.runner import RunnerDeployment
from prefect.flow_runs import suspend_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from edgeqa.config import load_params
from edgeqa.notify import notify
from edgeqa.release.registry import Registry
from edgeqa.stack import Stack, StackConfig

RUN = INPUTS + TASK_SOURCE + RUN_ID  # within one run only: what a resumed run did before it was suspended
MAX_WAITS = 10  # refused inputs before the run gives up (each one is logged and kept)


class ReviewerDecision(RunInput):
    """The form a reviewer fills in the Prefect UI (or `edgeqa approve|reject` fills, signed)."""

    decision: Literal["approve", "reject"] = Field(
        description="approve: production moves to this version. reject: nothing moves")
    reviewer: str = Field(description="your name, as in release.reviewers in params.yaml")
    token: str = Field(default="", description="your one-time token: `edgeqa approval-token VERSION --reviewer "
                                               "NAME` (it works once)")
    comment: str = Field(default="", description="why; kept with the decision in the registry")
    signed_record: str = Field(default="", description="filled by `edgeqa approve|reject`; leave it empty here")


def _registry(repo: Path) -> tuple[Registry, Stack]:
    stack = Stack(StackConfig.load(repo))
    stack.check_s3()
    return Registry(stack.s3_client(), stack.cfg.buckets["releases"]), stack


@task(name="gate-report", cache_policy=RUN)
def gate_report(repo: str) -> dict[str, Any]:
    """The `gate` stage's verdict (DVC-tracked inputs only), published as an artifact of this release."""
    params = load_params(Path(repo) / "params.yaml")
    f = Path(repo) / params.paths.reports_dir / "gate" / "report.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: run the pipeline first (`make run`); the gate decides what ships")
    res: dict[str, Any] = json.loads(f.read_text())
    md = f.with_suffix(".md")
    if md.is_file():
        create_markdown_artifact(key="release-gate", markdown=md.read_text(), description="the gate's report")
    return res


@task(name="build-release", cache_policy=RUN)
def build_release(repo: str, commit: str, key_file: str | None, key_secret: str | None = None) -> dict[str, Any]:
    """The signed release bundle under the stack's state folder, `releases/<version>` (built once per version).
    The signing key: the Prefect Secret block `key_secret`, else `key_file`, else as `edgeqa keys public`."""
    from edgeqa.release.build import build, manifest_sha256
    from edgeqa.release.signing import from_secret, load_or_create

    root = Path(repo)
    params = load_params(root / "params.yaml")
    work = StackConfig.load(root).path("releases")  # a local folder: no S3 call needed here
    key, origin = from_secret(key_secret) if key_secret else load_or_create(Path(key_file) if key_file else None)
    tmp = work / f".build-{uuid.uuid4().hex[:8]}"
    m = build(root, params, tmp, key, commit=commit)
    dest = work / m["version"]
    if dest.exists() and manifest_sha256(dest) == manifest_sha256(tmp):
        shutil.rmtree(tmp)
    elif dest.exists():
        shutil.rmtree(tmp)
        raise FileExistsError(f"{dest} holds another build of version {m['version']}; move it away, release again")
    else:
        tmp.rename(dest)
    get_run_logger().info("release bundle %s (signed by %s from %s) at %s", m["version"], m["signed_by"], origin,
                          dest)
    return {"version": m["version"], "dir": str(dest), "gate_report_sha256": m["gate"]["report_sha256"],
            "git_commit": m["lineage"]["git_commit"]}


@task(name="already-released", cache_policy=RUN)
def already_released(repo: str, version: str) -> str | None:
    """The alias (production or staging) that holds `version` already, if any."""
    reg, _ = _registry(Path(repo))
    for alias in ("production", "staging"):
        ptr, _ = reg.pointer(alias)
        if ptr is not None and ptr["to"] == version:
            return alias
    return None


@task(name="champion-challenger", cache_policy=RUN)
def champion_challenger(repo: str, candidate_dir: str) -> dict[str, Any]:
    """The candidate against the bundle in production now, on the same test images, interleaved on this CPU."""
    from edgeqa.release.challenger import compare, render

    root = Path(repo)
    params = load_params(root / "params.yaml")
    reg, stack = _registry(root)
    ptr, _ = reg.pointer("production")
    champion_dir = None
    if ptr is not None:
        champion_dir = stack.cfg.path("releases", ".champions", ptr["to"])
        if not champion_dir.is_dir():
            tmp = champion_dir.with_name(f".{ptr['to']}.{uuid.uuid4().hex[:8]}")
            reg.download(ptr["to"], tmp)
            tmp.rename(champion_dir)
    r = params.release
    res = compare(r.challenger, Path(candidate_dir), champion_dir, ptr["to"] if ptr else None,
                  root / params.paths.ingest_dir / "manifest.parquet", params.evaluate.split,
                  list(params.ingest.mask_facts.size_classes), r.threads, r.max_reason_tokens, root=root)
    create_markdown_artifact(key="release-champion-challenger", markdown=render(res),
                             description="candidate vs production, same images, same run, this CPU")
    return res


@task(name="publish-and-stage", cache_policy=RUN)
def publish_and_stage(repo: str, built: dict[str, Any], reason: str, run_id: str | None) -> dict[str, Any]:
    """Publish the bundle and point `staging` at it; the staging event opens the approval request (its
    deadline, and the run that waits for it)."""
    root = Path(repo)
    timeout = load_params(root / "params.yaml").release.approval_timeout_s
    reg, _ = _registry(root)
    pub = reg.publish(Path(built["dir"]))
    current, _ = reg.pointer("staging")
    if current is not None and current["to"] == built["version"] and current.get("flow_run_id") == run_id:
        return {"created": pub["created"], "event": current}  # this run staged it already (resumed on new code)
    end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=timeout)
    ev = reg.promote(built["version"], "staging", reason=reason, gate_report_sha256=built["gate_report_sha256"],
                     extra={"approval_deadline": end.isoformat(timespec="seconds"), "flow_run_id": run_id,
                            "challenger": built.get("challenger_summary")})
    if current is not None and current.get("flow_run_id") not in (None, run_id):
        _close_superseded(current["flow_run_id"], current["to"], built["version"])
    return {"created": pub["created"], "event": ev}


def _close_superseded(run_id: str, old: str, new: str) -> None:
    """The run that waits for a decision on the version staging held before: cancelled, since that request is
    closed (the registry would refuse its decision anyway)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        try:
            fr = client.read_flow_run(uuid.UUID(run_id))
        except Exception:  # noqa: BLE001 - a run this server no longer knows waits for nothing
            return
        if fr.state is not None and fr.state.is_paused():
            client.set_flow_run_state(fr.id, Cancelled(message=f"superseded: {new} replaced {old} on staging"),
                                      force=True)
            get_run_logger().info("cancelled the waiting release run %s: %s replaced %s on staging", run_id, new,
                                  old)


def _grant(version: str, reviewer: str, consume: bool) -> dict[str, Any] | None:
    """The token grant kept for `reviewer` on `version` (a Prefect Secret block), deleted when consumed."""
    from prefect.client.orchestration import get_client

    from edgeqa.release.approval import token_block_name

    name = token_block_name(version, reviewer)
    try:
        block = cast(Secret[Any], Secret.load(name))
    except ValueError:  # no such block: never issued, or used already
        return None
    value = block.get()  # Prefect keeps a JSON value as JSON
    grant: dict[str, Any] = value if isinstance(value, dict) else json.loads(str(value))
    if consume and block._block_document_id is not None:
        with get_client(sync_client=True) as client:
            client.delete_block_document(block._block_document_id)
    return grant


@task(name="apply-decision", cache_policy=RUN)
def apply_decision(repo: str, version: str, staging_event: dict[str, Any], given: dict[str, Any]
                   ) -> dict[str, Any]:
    """Check a reviewer's input and act on it: keep the decision, move production on an approval. A refused
    input is logged and kept under `refusals/<version>/`; it moves nothing."""
    from edgeqa.release.approval import ApprovalError, RequestClosed, record, ui_record, verify_token

    root = Path(repo)
    reviewers = load_params(root / "params.yaml").release.reviewers
    reg, _ = _registry(root)
    log = get_run_logger()
    try:
        if given.get("signed_record"):
            rec = json.loads(given["signed_record"])
            if (rec.get("decision") or {}).get("version") != version:
                raise ApprovalError(f"the signed decision is about {(rec.get('decision') or {}).get('version')}, "
                                    f"not {version}")
        elif given.get("token"):
            # consumed before it is checked: a wrong guess burns the token too, so it cannot be tried twice
            grant = _grant(version, given["reviewer"], consume=True)
            verify_token(grant, given["token"], reviewers, version, given["reviewer"], staging_event)
            assert grant is not None
            rec = ui_record(grant, given["decision"], given.get("comment", ""))
        else:
            raise ApprovalError("the decision carries neither a token nor a signed record: in the form, paste the "
                                "one-time token from `edgeqa approval-token`; or use `edgeqa approve|reject`")
        res = record(reg, reviewers, rec)
    except (ApprovalError, ValueError) as exc:
        why = str(exc)
        log.warning("refused decision on %s by %r: %s", version, given.get("reviewer"), why)
        key = f"refusals/{version}/{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.json"
        safe = {k: v for k, v in given.items() if k != "token"}  # never keep a typed token
        reg.s3.put_object(Bucket=reg.bucket, Key=key, Body=json.dumps({"input": safe, "why": why}).encode())
        create_markdown_artifact(key="release-refused-decision", description="a decision that was refused",
                                 markdown=f"# refused decision on {version}\n\nby {given.get('reviewer')!r}: {why}\n")
        # a request that expired, or that a later candidate replaced on staging, takes no more decisions
        return {"ok": False, "why": why, "closed": isinstance(exc, RequestClosed)}
    d = res["record"]["decision"]
    moved = (f"production: {res['event']['from'] or '(none)'} -> {version} (audit event {res['event']['seq']})"
             if res["event"] else "nothing moved")
    create_markdown_artifact(key="release-decision", description="the decision on this release", markdown=(
        f"# {d['decision']}: {version}\n\n| | |\n|---|---|\n| reviewer | {d['reviewer']} ({d['role']}) |\n"
        f"| when | {d['when']} |\n| via | {d.get('via', 'edgeqa CLI, signed')} |\n"
        f"| key | {res['record']['key_id']} |\n| comment | {d.get('comment', '')} |\n| kept at | "
        f"`{res['object']}` |\n| result | {moved} |\n"))
    return {"ok": True, "decision": d["decision"], "reviewer": d["reviewer"], "role": d["role"], "moved": moved,
            "event": res["event"]}


def _finish(outcome: dict[str, Any]) -> dict[str, Any]:
    get_run_logger().info("release %s: %s", outcome["outcome"], outcome["summary"])
    create_markdown_artifact(key="release-summary", description="the release's outcome",
                             markdown=f"# release: {outcome['outcome']}\n\n{outcome['summary']}\n")
    return outcome


@flow(name="edgeqa-release", log_prints=True, on_completion=[notify], on_failure=[notify], on_crashed=[notify])
def release(repo: str = ".", commit: str = "HEAD", reason: str = "", key_file: str | None = None,
            key_secret: str | None = None) -> dict[str, Any]:
    """Gate -> release bundle -> champion/challenger -> publish -> staging -> a reviewer -> production.
    Returns the outcome: `refused` (with `by`: gate or champion), `unchanged` (already released),
    `released` (on production), `rejected` (by a reviewer, or the wait timed out)."""
    from edgeqa.release.approval import deadline

    root = str(Path(repo).resolve())
    gate = gate_report(root)
    if not gate["passed"]:
        return _finish({"outcome": "refused", "by": "gate", "summary": gate["summary"], "version": None})
    built = build_release(root, commit, key_file, key_secret)
    held = already_released(root, built["version"])
    if held is not None:
        return _finish({"outcome": "unchanged", "version": built["version"], "summary": (
            f"nothing new: {built['version']} is already {held} (no new version, no approval request)")})
    cc = champion_challenger(root, built["dir"])
    if not cc["passed"]:
        return _finish({"outcome": "refused", "by": "champion", "summary": cc["summary"],
                        "version": built["version"], "challenger": cc})
    run_id = str(flow_run.id) if flow_run.id else None
    staged = publish_and_stage(root, {**built, "challenger_summary": cc["summary"]},
                               reason or f"gate passed; {cc['summary']}", run_id)
    ev, version = staged["event"], built["version"]
    base = {"version": version, "challenger": cc, "staging_event": ev, "dir": built["dir"],
            "git_commit": built["git_commit"]}
    get_run_logger().info("%s is on staging; waiting for a reviewer: the form of this run in the Prefect UI "
                          "(token: edgeqa approval-token %s --reviewer NAME), or edgeqa approve|reject %s "
                          "--reviewer NAME", version, version, version)
    end = deadline(ev)
    for attempt in range(MAX_WAITS):
        left = int((end - dt.datetime.now(dt.UTC)).total_seconds()) if end else None
        given = suspend_flow_run(wait_for_input=ReviewerDecision, timeout=max(left, 1) if left is not None else None,
                                 key=f"approval-{attempt}")
        res = apply_decision(root, version, ev, given.model_dump(exclude={"metadata"}))
        if res["ok"]:
            outcome = "released" if res["decision"] == "approve" else "rejected"
            return _finish({**base, "outcome": outcome, "decision": res, "summary": (
                f"{version}: {res['decision']} by {res['reviewer']} ({res['role']}); {res['moved']}")})
        if res["closed"]:
            return _finish({**base, "outcome": "rejected", "summary": f"{version}: {res['why']}"})
    return _finish({**base, "outcome": "rejected", "summary": (
        f"{version}: {MAX_WAITS} decisions were refused; the request is closed, release again")})


def deploy(repo: Path, work_pool: str) -> str:
    """Apply the deployment `edgeqa-release/edgeqa-release` for the project at `repo` (idempotent)."""
    src = cast(Flow[..., Any], flow.from_source(source=str(Path(repo).resolve()),
                                                entrypoint="flows/release.py:release"))
    dep = cast(RunnerDeployment, src.to_deployment(name="edgeqa-release", work_pool_name=work_pool, description=(
        "gate -> signed bundle -> champion/challenger -> staging -> a reviewer -> production")))
    return str(dep.apply())
