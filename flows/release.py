"""Prefect flow `edgeqa-release`: the gate's report -> the signed release bundle (model card, lineage,
version) -> champion/challenger and latency against what is in production now (never cached) -> publish to
the S3 registry -> `staging`. Production needs a reviewer's signed approval: `edgeqa approve VERSION`
(`edgeqa.release.approval`). Waiting for it inside this flow (a suspended run resumed on a worker, with a
form in the Prefect UI) is not built yet.

A refusal (the gate, or the champion) is an outcome, not a crash: the flow completes with `outcome: refused`
and a summary naming the rule, its value and its threshold; nothing leaves the candidate area. A candidate
already on staging or production creates no new version and no request.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from edgeqa.config import load_params
from edgeqa.release.registry import Registry
from edgeqa.stack import Stack, StackConfig


def _registry(repo: Path) -> tuple[Registry, Stack]:
    stack = Stack(StackConfig.load(repo))
    stack.check_s3()
    return Registry(stack.s3_client(), stack.cfg.buckets["releases"]), stack


@task(name="gate-report", cache_policy=NO_CACHE)
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


@task(name="build-release", cache_policy=NO_CACHE)
def build_release(repo: str, commit: str, key_file: str | None) -> dict[str, Any]:
    """The signed release bundle under the stack's state folder, `releases/<version>` (built once per version)."""
    from edgeqa.release.build import build, manifest_sha256
    from edgeqa.release.signing import load_or_create

    root = Path(repo)
    params = load_params(root / "params.yaml")
    work = StackConfig.load(root).path("releases")  # a local folder: no S3 call needed here
    key, origin = load_or_create(Path(key_file) if key_file else None)
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


@task(name="champion-challenger", cache_policy=NO_CACHE)
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


@task(name="publish-and-stage", cache_policy=NO_CACHE)
def publish_and_stage(repo: str, built: dict[str, Any], reason: str) -> dict[str, Any]:
    reg, _ = _registry(Path(repo))
    pub = reg.publish(Path(built["dir"]))
    ev = reg.promote(built["version"], "staging", reason=reason, gate_report_sha256=built["gate_report_sha256"])
    return {"created": pub["created"], "event": ev}


def _finish(outcome: dict[str, Any]) -> dict[str, Any]:
    get_run_logger().info("release %s: %s", outcome["outcome"], outcome["summary"])
    create_markdown_artifact(key="release-summary", description="the release's outcome",
                             markdown=f"# release: {outcome['outcome']}\n\n{outcome['summary']}\n")
    return outcome


@flow(name="edgeqa-release", log_prints=True)
def release(repo: str = ".", commit: str = "HEAD", reason: str = "", key_file: str | None = None
            ) -> dict[str, Any]:
    """Gate -> release bundle -> champion/challenger -> publish -> staging. Returns the outcome:
    `refused` (with `by`: gate or champion), `unchanged` (already released) or `staged`."""
    root = str(Path(repo).resolve())
    gate = gate_report(root)
    if not gate["passed"]:
        return _finish({"outcome": "refused", "by": "gate", "summary": gate["summary"], "version": None})
    built = build_release(root, commit, key_file)
    reg, _ = _registry(Path(root))
    for alias in ("production", "staging"):
        ptr, _ = reg.pointer(alias)
        if ptr is not None and ptr["to"] == built["version"]:
            return _finish({"outcome": "unchanged", "version": built["version"], "summary": (
                f"nothing new: {built['version']} is already {alias} (no new version, no approval request)")})
    cc = champion_challenger(root, built["dir"])
    if not cc["passed"]:
        return _finish({"outcome": "refused", "by": "champion", "summary": cc["summary"],
                        "version": built["version"], "challenger": cc})
    staged = publish_and_stage(root, built, reason or f"gate passed; {cc['summary']}")
    ev = staged["event"]
    return _finish({"outcome": "staged", "version": built["version"], "challenger": cc, "event": ev,
                    "dir": built["dir"], "git_commit": built["git_commit"], "summary": (
                        f"{built['version']} -> staging (audit event {ev['seq']}); {cc['summary']}. Production "
                        f"needs a reviewer's signed approval: edgeqa approve {built['version']} --reviewer NAME")})
