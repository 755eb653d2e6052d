"""`edgeqa`: the command line. Infrastructure (up/down/status), profiles, the pipeline run, benchmarks, and
`predict` with an edge bundle.

Every command acts on the project of the current directory (the nearest folder at or above it with dvc.yaml),
or on `--project DIR`; never on the folder edgeqa was installed from. Prefect is imported only inside the
commands that need it, after PREFECT_API_URL points at the local server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgeqa.project import ProjectError, find_project, load_project_module
from edgeqa.stack import Stack, StackConfig, StackError

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
profile_app = typer.Typer(help="Profiles: dotted-key overrides written into params.yaml (as `dvc exp run -S`).",
                          no_args_is_help=True)
app.add_typer(profile_app, name="profile")
keys_app = typer.Typer(help="The release signing key (ed25519): devices trust its public half.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
releases_app = typer.Typer(help="The release registry on S3: published versions, the staging and production "
                                "aliases, and their audit log.", no_args_is_help=True)
app.add_typer(releases_app, name="releases")
notify_app = typer.Typer(help="Notifications when a pipeline or release run completes or fails (a Prefect "
                              "notification block, ops.notify_block).", no_args_is_help=True)
app.add_typer(notify_app, name="notify")
feedback_app = typer.Typer(help="What the line saw, back to S3: prediction logs under feedback/ in the releases "
                                "bucket.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")
console = Console()
_state: dict[str, Path | None] = {"project": None}


@app.callback()
def _options(project: Annotated[Path | None, typer.Option(
        "--project", help="the project folder (default: the nearest folder at or above the current one with "
                          "dvc.yaml)", file_okay=False)] = None) -> None:
    _state["project"] = project


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {msg}", markup=True, highlight=False)
    raise typer.Exit(code)


def project_root() -> Path:
    """The project this invocation acts on."""
    given = _state["project"]
    try:
        if given is not None:
            root = Path(given).resolve()
            if not (root / "dvc.yaml").is_file():
                raise ProjectError(f"--project {given}: no dvc.yaml in {root}; point it at an edgeqa project")
            return root
        return find_project()
    except ProjectError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


def _stack() -> Stack:
    try:
        return Stack(StackConfig.load(project_root()))
    except StackError as exc:
        _fail(str(exc))
        raise


def _stack_up() -> Stack:
    """The project's stack, started if it is not up, with this process's Prefect client pointed at it."""
    stack = _stack()
    try:
        stack.up()
    except StackError as exc:
        _fail(str(exc))
    use_stack_env(stack)
    return stack


def use_stack_env(stack: Stack) -> None:
    """Point this process's Prefect client and DVC/boto3 at the local stack (before importing prefect)."""
    os.environ.update({k: v for k, v in stack.prefect_env().items()
                       if k in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")})
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@app.command()
def up() -> None:
    """Start SeaweedFS (S3) and the Prefect server on 127.0.0.1, create buckets, configure the DVC remote."""
    stack = _stack()
    try:
        status = stack.up()
        stack.configure_dvc(project_root())
    except StackError as exc:
        _fail(str(exc))
    if stack.cfg.external("prefect"):
        # the local deployments run from this checkout's path, which an external pool's workers cannot see
        console.print(f"Prefect at {stack.cfg.prefect_api_url} is external: apply its deployments from prefect.yaml "
                      f"(`prefect deploy --all`, EDGEQA_GIT_URL set) for the pool {stack.cfg.work_pool}",
                      highlight=False)
    else:
        deploy_release(stack, project_root())
        deploy_nightly(stack, project_root())
    _print_status(status)


@app.command("prepare", hidden=True)
def prepare() -> None:
    """Build the schema-only Prefect DB template for this venv (run by `make setup`)."""
    try:
        console.print(f"prefect DB template: {Stack.build_prefect_db_template()}")
    except StackError as exc:
        _fail(str(exc))


@app.command()
def down() -> None:
    """Stop the local stack and wait for a clean exit. State is kept under the state folder."""
    _stack().down()
    console.print("stack stopped")


@app.command()
def status() -> None:
    """Show whether each service is up and healthy."""
    _print_status(_stack().status())


def _print_status(status: dict[str, str]) -> None:
    t = Table("service", "state")
    for k, v in status.items():
        t.add_row(k, v)
    console.print(t)


@profile_app.command("list")
def profile_list() -> None:
    """List the profiles."""
    from edgeqa.config.profiles import available

    for name in available(project_root()):
        console.print(name)


@profile_app.command("apply")
def profile_apply(name: str, params: Annotated[Path | None, typer.Option(
        help="params file (default: the project's params.yaml)")] = None) -> None:
    """Write profile NAME into params.yaml (DVC's override mechanism), showing what changed."""
    from edgeqa.config import ParamsError
    from edgeqa.config.profiles import apply

    root = project_root()
    target = params if params is not None else root / "params.yaml"
    try:
        changes = apply(name, target, root)
    except ParamsError as exc:
        _fail(str(exc))
    if not changes:
        console.print(f"{target} already holds profile {name}")
    for k, (old, new) in changes.items():
        console.print(f"{k}: {old!r} -> {new!r}", highlight=False)


@app.command()
def run(profile: Annotated[str | None, typer.Option(help="apply this profile to params.yaml first")] = None,
        push: Annotated[bool, typer.Option(help="dvc push the outputs to the S3 remote")] = True,
        target: Annotated[str | None, typer.Option(help="run only this stage and the stages it needs")] = None,
        release_after: Annotated[bool, typer.Option("--release/--no-release", help="then save the run (`dvc exp "
                                                    "save`) and release it through the gate")] = True,
        ) -> None:
    """Bring the stack up if needed and run the project's `edgeqa-pipeline` flow against the local Prefect server."""
    from edgeqa.config import ParamsError, load_params

    root = project_root()
    if profile:
        profile_apply(profile, None)
    try:
        params = load_params(root / "params.yaml")
    except ParamsError as exc:
        _fail(str(exc))
    stack = _stack()
    try:
        stack.up()
        stack.configure_dvc(root)
    except StackError as exc:
        _fail(str(exc))
    use_stack_env(stack)
    pipeline = load_project_module(root, "flows.pipeline").pipeline

    flow = pipeline.with_options(result_storage=f"s3-bucket/{stack.cfg.prefect_block}", persist_result=True)
    bench = str(Path(params.paths.bench_dir) / "pipeline.json")
    state = flow(repo=str(root), push=push, bench_file=bench, target=target, return_state=True)
    run_id = state.state_details.flow_run_id
    url = f"{stack.cfg.prefect_ui_url}/runs/flow-run/{run_id}"
    if state.is_completed():
        console.print(f"[green]pipeline completed[/green]; the run in the Prefect UI: {url}", highlight=False)
        gate_report = root / params.paths.reports_dir / "gate" / "report.json"
        if gate_report.is_file():  # a refusal is an outcome, not a failure: make run still exits 0
            res = json.loads(gate_report.read_text())
            colour = "green" if res["passed"] else "yellow"
            console.print(f"[{colour}]gate[/{colour}] {res['summary']}\n(report: {gate_report.with_suffix('.md')})",
                          highlight=False)
        if release_after and target is None:
            # the run as it is now, saved as an experiment, is what the release names; a refusal is an outcome
            commit = exp_save(root)
            console.print(f"saved the run as experiment commit {commit[:12]} (dvc exp save); releasing it",
                          highlight=False)
            fr, url = _start_release(stack, root, commit, "make run", None, wait=False)
            _report_release(fr, url)
    else:
        console.print(f"[red]pipeline {state.name}[/red]: {state.message}\nthe run in the Prefect UI: {url}",
                      highlight=False)
        raise typer.Exit(1)


@app.command()
def bench() -> None:
    """Measure what the pipeline built and the stack's overheads; write reports/bench/*.json."""
    from edgeqa.bench import main as bench_main

    raise typer.Exit(bench_main(project_root()))


@app.command()
def seeds(seed: Annotated[list[int] | None, typer.Option(
              "--seed", help="a student.seed to train with (repeat; default 0 1 2 3 4)")] = None,
          bootstrap: Annotated[int, typer.Option(help="bootstrap resamples")] = 2000,
          fresh: Annotated[bool, typer.Option(help="forget earlier (seed, row) results and retrain all")] = False,
          params: Annotated[Path | None, typer.Option(
              help="params file (default: the project's params.yaml); to try a student lever over seeds")] = None,
          out: Annotated[Path | None, typer.Option(help="report folder (default: reports/seeds)")] = None
          ) -> None:
    """Retrain baseline, sft and distill with several seeds on what the pipeline built; mean +- sd and a paired
    bootstrap of each row against baseline in reports/seeds/report.md (not part of `make run`)."""
    import logging

    from edgeqa.errors import StageError
    from edgeqa.evaluation.seeds import main as seeds_main

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgeqa").setLevel(logging.INFO)
    try:
        res = seeds_main(project_root(), seed or [0, 1, 2, 3, 4], bootstrap, fresh, params, out)
    except StageError as exc:
        _fail(str(exc))
    print(f"seeds: distill - baseline AUROC {res['versus_baseline']['distill']['auroc']}")


@app.command()
def predict(
        target: Annotated[Path, typer.Argument(metavar="IMAGE_OR_FOLDER", help="an image, or a folder of images")],
        bundle: Annotated[str, typer.Option(help="the edge bundle folder (e.g. models/edge), or "
                                           "s3://BUCKET/production|staging|candidates/<version> (downloaded once "
                                           "into the cache, verified on every use)")],
        out: Annotated[Path | None, typer.Option(help="write JSON lines here (default: stdout)")] = None,
        threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads")] = 1,
        max_reason_tokens: Annotated[int | None, typer.Option(help="cap on the reason (default: the bundle's)")]
        = None,
        progress: Annotated[bool, typer.Option(help="progress bar on stderr")] = True,
        trust: Annotated[Path | None, typer.Option(help="trusted public keys (PEM); default: "
                                                   "$EDGEQA_TRUSTED_KEYS_FILE, then $EDGEQA_TRUSTED_KEYS")] = None,
        require_signature: Annotated[bool, typer.Option(help="refuse when no trusted keys are configured")]
        = False,
        log: Annotated[Path | None, typer.Option(help="also append each answer to this prediction log, for "
                                                 "`edgeqa feedback push`")] = None) -> None:
    """Answer an image or every image in a folder with an edge bundle, as `edgeqa-edge predict` on a device
    (the same function): one JSON line per image; an unreadable image gets its own line with `error`. An s3://
    bundle uses boto3's settings (AWS_*), else the project's local SeaweedFS.
    Exit 0: all answered; 1: some images unreadable; 2: the bundle or the arguments were refused."""
    from edgeqa_runtime.bundle import BundleError
    from edgeqa_runtime.cli import predict as edge_predict
    from edgeqa_runtime.remote import is_remote

    if is_remote(bundle) and not os.environ.get("AWS_ACCESS_KEY_ID"):
        os.environ.update(_stack().s3_env())  # no S3 settings of its own: the project's local store
    try:
        code = edge_predict(bundle, target, out, threads, max_reason_tokens, progress, trust=trust,
                            require_signature=require_signature, log=log)
    except (BundleError, FileNotFoundError) as exc:
        _fail(str(exc))
        raise
    raise typer.Exit(code)


@keys_app.command("public")
def keys_public(out: Annotated[Path | None, typer.Option(help="write the PEM here (default: stdout)")] = None,
                key_file: Annotated[Path | None, typer.Option(help="the signing key file (default: "
                                                              "$EDGEQA_SIGNING_KEY, $EDGEQA_SIGNING_KEY_FILE, "
                                                              "~/.config/edgeqa/release-signing-key.pem)")] = None
                ) -> None:
    """The public key devices put in their trust config (the key is created at first use, mode 600)."""
    from edgeqa.errors import StageError
    from edgeqa.io import atomic_write_text
    from edgeqa.release.signing import load_or_create
    from edgeqa_runtime.trust import key_id, public_pem

    try:
        key, origin = load_or_create(key_file)
    except StageError as exc:
        _fail(str(exc))
        raise
    pem = public_pem(key.public_key())
    if out is None:
        print(pem, end="")
    else:
        atomic_write_text(out, pem)
        console.print(f"key {key_id(key.public_key())} (from {origin}) -> {out}", highlight=False)


@keys_app.command("reviewer")
def keys_reviewer(name: Annotated[str, typer.Argument(help="the reviewer's name, as in release.reviewers")],
                  role: Annotated[str, typer.Option(help="the reviewer's role, recorded with each decision")],
                  key_file: Annotated[Path | None, typer.Option(help="where the private key lives (default: "
                                                                "~/.config/edgeqa/reviewer-NAME.pem)")] = None
                  ) -> None:
    """A reviewer's ed25519 key (created at first use, mode 600, outside git); prints the release.reviewers entry
    to add to params.yaml (commit it: the allow-list is reviewed like code)."""
    from edgeqa.errors import StageError
    from edgeqa.release.approval import key_path, reviewer_entry
    from edgeqa.release.signing import load_or_create
    from edgeqa_runtime.trust import key_id, public_pem

    path = key_file or key_path(name)
    try:
        key, origin = load_or_create(path, what=f"reviewer key for {name}")
    except StageError as exc:
        _fail(str(exc))
        raise
    console.print(f"# reviewer {name}: key {key_id(key.public_key())} in {origin}; add under release.reviewers:",
                  highlight=False)
    print(reviewer_entry(name, role, public_pem(key.public_key())), end="")


@app.command()
def sign(bundle: Annotated[Path, typer.Argument(help="the edge bundle folder (e.g. models/edge)")],
         out: Annotated[Path, typer.Option(help="the signed copy (a new folder)")],
         key_file: Annotated[Path | None, typer.Option(help="the signing key file (default: as `keys public`)")]
         = None) -> None:
    """Copy a verified bundle to a new folder and sign its manifest there (ed25519, `manifest.sig`)."""
    from edgeqa.errors import StageError
    from edgeqa.release.signing import load_or_create, sign_copy
    from edgeqa_runtime.bundle import BundleError

    try:
        key, origin = load_or_create(key_file)
        rec = sign_copy(bundle, out, key)
    except (StageError, BundleError) as exc:
        _fail(str(exc))
        raise
    console.print(f"signed {out} with key {rec['key_id']} (from {origin})", highlight=False)


# ------------------------------------------------------------------------------------------ the registry
def _registry() -> Any:
    from edgeqa.release.registry import Registry

    stack = _stack()
    try:
        stack.check_s3()
    except StackError as exc:
        _fail(str(exc))
    return Registry(stack.s3_client(), stack.cfg.buckets["releases"])


def _registry_call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from edgeqa.errors import StageError
    from edgeqa_runtime.bundle import BundleError

    try:
        return fn(*args, **kwargs)
    except (StageError, BundleError) as exc:
        _fail(str(exc))


def _aliases(reg: Any) -> dict[str, str]:
    from edgeqa.release.registry import ALIASES

    out = {}
    for alias in ALIASES:
        ptr, _ = reg.pointer(alias)
        if ptr is not None:
            out[alias] = ptr["to"]
    return out


@releases_app.command("list")
def releases_list(as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False) -> None:
    """Every published version (one whose manifest is uploaded), oldest first, with the aliases on it."""
    reg = _registry()
    versions, aliases = reg.versions(), _aliases(reg)
    for v in versions:
        v["aliases"] = sorted(a for a, to in aliases.items() if to == v["version"])
    if as_json:
        print(json.dumps(versions, indent=1))
        return
    t = Table("version", "published", "aliases", title=f"s3://{reg.bucket}/candidates/")
    for v in versions:
        t.add_row(v["version"], v["published"], ", ".join(v["aliases"]))
    console.print(t)


@releases_app.command("show")
def releases_show(version: str) -> None:
    """A published version's manifest: source model, metrics, lineage, files, and the aliases on it."""
    reg = _registry()
    m = _registry_call(reg.manifest, version)
    if m is None:
        _fail(f"no version {version!r} in s3://{reg.bucket}/candidates/ (see `edgeqa releases list`)")
    files = m.pop("files")
    m["aliases"] = sorted(a for a, to in _aliases(reg).items() if to == version)
    m["files"] = {name: e["sha256"][:16] for name, e in files.items()}
    m["bytes"] = sum(e["bytes"] for e in files.values())
    m["decisions"] = [{k: r["decision"].get(k) for k in ("decision", "reviewer", "role", "when", "comment", "via")}
                      for r in _registry_call(reg.records, "decisions", version)]
    m["refused_decisions"] = [{"key": r["key"], "reviewer": r["input"].get("reviewer"), "why": r["why"]}
                              for r in _registry_call(reg.records, "refusals", version)]
    print(json.dumps(m, indent=1, sort_keys=True))


@releases_app.command("audit")
def releases_audit(alias: Annotated[str, typer.Option(help="staging or production")] = "production",
                   as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False) -> None:
    """Every change of an alias, oldest first: who, when, from, to, why, and the gate report's hash."""
    reg = _registry()
    events = _registry_call(reg.audit, alias)
    if as_json:
        print(json.dumps(events, indent=1))
        return
    t = Table("seq", "when", "action", "from", "to", "who", "reason", title=f"audit/{alias}/")
    for e in events:
        t.add_row(str(e["seq"]), e["when"], e["action"], e["from"] or "-", e["to"], e["who"], e["reason"])
    console.print(t)


@app.command()
def publish(bundle: Annotated[Path, typer.Argument(help="a signed bundle folder (`edgeqa sign`)")]) -> None:
    """Upload a signed bundle to the registry as candidates/<version>/: every file read back against its
    SHA-256, the manifest last (a version without it does not exist). The same bundle again is a no-op."""
    reg = _registry()
    res = _registry_call(reg.publish, bundle)
    verb = "published" if res["created"] else "already published (nothing uploaded):"
    console.print(f"{verb} {res['version']} -> s3://{reg.bucket}/candidates/{res['version']}/", highlight=False)


@app.command()
def promote(version: str,
            to: Annotated[str, typer.Option(help="the alias to move: staging (production: `edgeqa approve`)")],
            reason: Annotated[str, typer.Option(help="why; kept in the audit log")] = "",
            who: Annotated[str | None, typer.Option(help="recorded as who (default: user@host)")] = None) -> None:
    """Point `staging` at a published version (production moves only by a signed approval: `edgeqa approve`).
    The pointer is written conditionally (a concurrent change is never lost); every change appends one audit
    event."""
    if to == "production":
        _fail("production moves only by a reviewer's signed approval: edgeqa approve VERSION --key FILE "
              "(the version must be on staging; `edgeqa rollback` restores the previous production)")
    reg = _registry()
    ev = _registry_call(reg.promote, version, to, who=who, reason=reason)
    console.print(f"{to}: {ev['from'] or '(none)'} -> {ev['to']} (audit event {ev['seq']}, by {ev['who']})",
                  highlight=False)


def _reviewer_key(key_file: Path | None, reviewer: str | None) -> Any:
    from edgeqa.errors import StageError
    from edgeqa.release.approval import key_path
    from edgeqa.release.signing import load_or_create

    if key_file is None and reviewer is None:
        _fail("name the reviewer's key: --key FILE, or --reviewer NAME for ~/.config/edgeqa/reviewer-NAME.pem")
    path = key_file or key_path(str(reviewer))
    if not path.is_file():
        _fail(f"{path}: no such key; a reviewer makes one with `edgeqa keys reviewer NAME --role ROLE`")
    try:
        return load_or_create(path, what="reviewer key")[0]
    except StageError as exc:
        _fail(str(exc))


def _waiting_run(stack: Stack, staging: dict[str, Any] | None) -> Any:
    """The suspended `edgeqa-release` run that waits for a decision on the version on staging, if any."""
    if not staging or not staging.get("flow_run_id"):
        return None
    use_stack_env(stack)
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(staging["flow_run_id"])
    except Exception:  # noqa: BLE001 - a run the server no longer knows waits for nothing
        return None
    return fr if fr.state is not None and fr.state.is_paused() else None


def _wait_run(run_id: Any, stop_when_paused: bool, timeout_s: float = 3600) -> Any:
    """Poll a flow run until it is final (or paused, if asked); the last FlowRun read."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(run_id)
            st = fr.state
            if st is not None and (st.is_final() or (stop_when_paused and st.is_paused())):
                return fr
            if time.monotonic() > deadline:
                _fail(f"flow run {run_id} still {st.name if st else '?'} after {timeout_s:.0f} s")
            time.sleep(1.0)


def _run_result(fr: Any) -> dict[str, Any]:
    res: dict[str, Any] = fr.state.result()
    return res


def _decide(version: str, decision: str, key_file: Path | None, reviewer: str | None, comment: str) -> None:
    from edgeqa.config import ParamsError, load_params
    from edgeqa.errors import StageError
    from edgeqa.release.approval import decide, sign_decision

    key = _reviewer_key(key_file, reviewer)
    stack = _stack()
    reg = _registry()
    try:
        params = load_params(project_root() / "params.yaml")
        staging, _ = reg.pointer("staging")
        waiting = _waiting_run(stack, staging) if staging and staging["to"] == version else None
        if waiting is None:  # no run waits (it was released before the wait existed, or its run is gone)
            res = decide(reg, params.release.reviewers, key, version, decision, comment)
        else:
            from prefect.flow_runs import resume_flow_run

            rec = sign_decision(key, params.release.reviewers, version, decision, comment, staging)
            resume_flow_run(waiting.id, run_input={"decision": decision, "reviewer": rec["decision"]["reviewer"],
                                                   "comment": comment, "signed_record": json.dumps(rec)})
            fr = _wait_run(waiting.id, stop_when_paused=True, timeout_s=600)
            url = f"{stack.cfg.prefect_ui_url}/runs/flow-run/{waiting.id}"
            if fr.state.is_paused():
                _fail(f"the release run refused the decision and waits again (see its logs): {url}")
            if not fr.state.is_completed():
                _fail(f"the release run {fr.state.name}: {fr.state.message}\n{url}")
            out = _run_result(fr)
            console.print(f"{out['outcome']}: {out['summary']}\nthe run in the Prefect UI: {url}", highlight=False)
            return
    except (StageError, ParamsError) as exc:
        _fail(str(exc))
        raise
    d = res["record"]["decision"]
    moved = f"; production: {res['event']['from'] or '(none)'} -> {version} (audit event {res['event']['seq']})" \
        if res["event"] else "; staging and production unchanged"
    console.print(f"{decision} {version} by {d['reviewer']} ({d['role']}), signed by key {res['record']['key_id']}"
                  f"{moved}", highlight=False)


_KEY = Annotated[Path | None, typer.Option("--key", help="the reviewer's private key file")]
_REVIEWER = Annotated[str | None, typer.Option(help="the reviewer's name: its key in ~/.config/edgeqa/")]


@app.command()
def approve(version: str, key: _KEY = None, reviewer: _REVIEWER = None,
            comment: Annotated[str, typer.Option(help="why; signed and kept in the audit log")] = "") -> None:
    """Approve the version on staging for production, signed with a reviewer's key from release.reviewers;
    production moves to it and the audit event carries the signed decision."""
    _decide(version, "approve", key, reviewer, comment)


@app.command()
def reject(version: str, key: _KEY = None, reviewer: _REVIEWER = None,
           comment: Annotated[str, typer.Option(help="why; signed and kept in the registry")] = "") -> None:
    """Reject the version on staging, signed with a reviewer's key; the decision is recorded, nothing moves."""
    _decide(version, "reject", key, reviewer, comment)


@app.command("approval-token")
def approval_token(version: str, key: _KEY = None, reviewer: _REVIEWER = None) -> None:
    """A one-time token for the approval form of the waiting release run in the Prefect UI. It is bound to you
    (your key signs its grant), to VERSION and to its staging request; only its hash is kept (a Prefect Secret
    block), and the run deletes it at first use. Issuing a new one replaces the last."""
    from edgeqa.config import ParamsError, load_params
    from edgeqa.errors import StageError
    from edgeqa.release.approval import issue_token, token_block_name

    k = _reviewer_key(key, reviewer)
    stack = _stack()
    reg = _registry()
    try:
        params = load_params(project_root() / "params.yaml")
        staging, _ = reg.pointer("staging")
        token, grant = issue_token(k, params.release.reviewers, version, staging)
    except (StageError, ParamsError) as exc:
        _fail(str(exc))
        raise
    waiting = _waiting_run(stack, staging)
    if waiting is None:
        _fail(f"no release run waits for a decision on {version}; use `edgeqa approve|reject {version}`")
    from prefect.blocks.system import Secret
    from pydantic import SecretStr

    name = token_block_name(version, grant["grant"]["reviewer"])
    Secret(value=SecretStr(json.dumps(grant))).save(name, overwrite=True)
    console.print(f"one-time token for {grant['grant']['reviewer']} on {version} (expires "
                  f"{grant['grant']['expires']}):", highlight=False)
    print(f"token: {token}")
    console.print(f"the form: {stack.cfg.prefect_ui_url}/runs/flow-run/{waiting.id} (Resume)", highlight=False)


@app.command()
def rollback(alias: Annotated[str, typer.Option(help="the alias to move back")] = "production",
             reason: Annotated[str, typer.Option(help="why; kept in the audit log")] = "",
             who: Annotated[str | None, typer.Option(help="recorded as who (default: user@host)")] = None) -> None:
    """Point an alias back at the version it held before its current one (an audit event like any other)."""
    reg = _registry()
    ev = _registry_call(reg.rollback, alias, who=who, reason=reason)
    console.print(f"{alias} rolled back: {ev['from']} -> {ev['to']} (audit event {ev['seq']}, by {ev['who']})",
                  highlight=False)


def deploy_release(stack: Stack, root: Path) -> None:
    """Apply the `edgeqa-release` deployment for this project on the stack's process work pool."""
    use_stack_env(stack)
    load_project_module(root, "flows.release").deploy(root, stack.cfg.work_pool)


def deploy_nightly(stack: Stack, root: Path) -> None:
    """Apply `edgeqa-pipeline/nightly` with the schedule in ops.nightly (params.yaml)."""
    from edgeqa.config import ParamsError, load_params

    try:
        nightly = load_params(root / "params.yaml").ops.nightly
    except ParamsError as exc:
        _fail(str(exc))
        raise
    use_stack_env(stack)
    load_project_module(root, "flows.pipeline").deploy_nightly(root, stack.cfg.work_pool, nightly)
    state = "paused (ops.nightly.active: false)" if not nightly.active else "active"
    console.print(f"deployment edgeqa-pipeline/nightly: cron '{nightly.cron}' ({nightly.timezone}), {state}",
                  highlight=False)


@app.command()
def nightly(wait: Annotated[bool, typer.Option(help="follow the run until it ends")] = True,
            timeout: Annotated[float, typer.Option(help="give up following after this many seconds")] = 6 * 3600
            ) -> None:
    """Start the `edgeqa-pipeline/nightly` deployment now, as its schedule would: on the local worker, in its
    own checkout of ops.nightly.ref, then the release. Exit 0 when the run completes, 1 when it fails."""
    root = project_root()
    stack = _stack_up()
    deploy_nightly(stack, root)
    from prefect.deployments import run_deployment

    fr: Any = run_deployment("edgeqa-pipeline/nightly", timeout=0)
    url = f"{stack.cfg.prefect_ui_url}/runs/flow-run/{fr.id}"
    console.print(f"nightly run {fr.name} on the worker: {url}", highlight=False)
    if not wait:
        return
    fr = _wait_run(fr.id, stop_when_paused=False, timeout_s=timeout)
    if not fr.state.is_completed():
        console.print(f"[red]nightly run {fr.state.name}[/red]: {fr.state.message}", highlight=False)
        raise typer.Exit(1)
    res = _run_result(fr)
    rel = res.get("release") or {}
    console.print(f"[green]nightly run {fr.name} completed[/green]: stages that ran: {', '.join(res['ran']) or 'none'}"
                  f"; experiment {(res.get('experiment') or {}).get('name')}; release: {rel.get('outcome', '-')} "
                  f"{rel.get('summary', '')}", highlight=False)


def _start_release(stack: Stack, root: Path, commit: str, reason: str, key_file: Path | None, wait: bool
                   ) -> tuple[Any, str]:
    """Apply the deployment, start a release run on the worker, and follow it until it waits for a reviewer
    (or, with `wait`, until it ends). The last FlowRun read, and its URL."""
    from prefect.deployments import run_deployment

    from edgeqa.release.signing import ENV_KEY, default_key_file

    deploy_release(stack, root)
    key_secret = None
    if key_file is None and os.environ.get(ENV_KEY):  # the worker has not this environment: a Secret block
        from prefect.blocks.system import Secret
        from pydantic import SecretStr

        key_secret = "edgeqa-release-signing-key"
        Secret(value=SecretStr(os.environ[ENV_KEY])).save(key_secret, overwrite=True)
    elif key_file is None:
        key_file = default_key_file()
    env = {k: v for k, v in os.environ.items() if k.startswith("EDGEQA_") and k.endswith("_BUCKET")}
    fr: Any = run_deployment("edgeqa-release/edgeqa-release", timeout=0, job_variables={"env": env},
                             parameters={"repo": str(root), "commit": commit, "reason": reason,
                                         "key_secret": key_secret,
                                         "key_file": str(key_file.resolve()) if key_file else None})
    url = f"{stack.cfg.prefect_ui_url}/runs/flow-run/{fr.id}"
    console.print(f"release run {fr.name} on the worker: {url}", highlight=False)
    return _wait_run(fr.id, stop_when_paused=not wait, timeout_s=3 * 3600 if not wait else 90 * 86400), url


def _report_release(fr: Any, url: str) -> int:
    """Print a release run's outcome; the exit code: 0 waiting/released/unchanged, 3 refused/rejected."""
    if fr.state.is_paused():
        staging, _ = _registry().pointer("staging")
        v = staging["to"] if staging else "?"
        if staging:
            console.print(f"champion/challenger: {staging.get('challenger')}", highlight=False)
        console.print(f"[green]staged[/green]: {v} is on staging and the run waits for a reviewer until "
                      f"{staging.get('approval_deadline') if staging else '?'}:\n  edgeqa approve {v} --reviewer NAME"
                      f"  (or reject)\n  or the form in the Prefect UI: {url} (token: edgeqa approval-token {v} "
                      "--reviewer NAME)", highlight=False)
        return 0
    if not fr.state.is_completed():
        _fail(f"the release flow {fr.state.name}: {fr.state.message}\nthe run in the Prefect UI: {url}")
    res = _run_result(fr)
    if res["outcome"] in ("refused", "rejected"):
        by = f" by the {res['by']}" if res.get("by") else ""
        where = "nothing was published" if res["outcome"] == "refused" else "production did not move"
        console.print(f"[yellow]release {res['outcome']}{by}[/yellow]: {res['summary']}\n{where}; the run in the "
                      f"Prefect UI: {url}", highlight=False)
        return 3
    colour = "green" if res["outcome"] == "released" else "cyan"
    console.print(f"[{colour}]release {res['outcome']}[/{colour}]: {res['summary']}\nthe run in the Prefect UI: "
                  f"{url}", highlight=False)
    return 0


@app.command()
def release(commit: Annotated[str, typer.Option(help="the commit the working tree equals (default HEAD)")]
            = "HEAD",
            reason: Annotated[str, typer.Option(help="why; kept in the audit log")] = "",
            key_file: Annotated[Path | None, typer.Option(help="the signing key file (default: as `keys public`)")]
            = None,
            wait: Annotated[bool, typer.Option(help="wait for the reviewer's decision too, not only until the "
                                                    "run waits for it")] = False) -> None:
    """Start the `edgeqa-release` deployment on the local worker: the gate's report; the signed release bundle
    (model card, lineage and version in its manifest) from a committed, `dvc status`-clean state;
    champion/challenger and latency against production, uncached; publish; `staging`; then the run waits for a
    reviewer (`edgeqa approve|reject VERSION`, or its form in the Prefect UI).
    Exit 0: waiting for a reviewer, released, or nothing new; 3: refused by the gate or the champion (nothing
    published), or rejected; 2: the release could not run (dirty tree, stale outputs, no stack...)."""
    root = project_root()
    stack = _stack_up()
    fr, url = _start_release(stack, root, commit, reason, key_file, wait)
    code = _report_release(fr, url)
    if code:
        raise typer.Exit(code)


@feedback_app.command("push")
def feedback_push(log: Annotated[Path, typer.Argument(help="the prediction log (`edgeqa predict --log FILE`)")],
                  device: Annotated[str, typer.Option(help="the device or line it came from (default: this host)")]
                  = "",
                  rotate: Annotated[bool, typer.Option(help="then rename the log to LOG.<hash>.pushed, so new "
                                                            "predictions start a new one")] = True) -> None:
    """Upload a prediction log to s3://<releases bucket>/feedback/<device>/ (every line checked first;
    content-addressed: the same log is stored once)."""
    import socket

    from edgeqa.errors import StageError
    from edgeqa.feedback import push

    stack = _stack()
    try:
        stack.check_s3()
    except StackError as exc:
        _fail(str(exc))
    try:
        res = push(stack.s3_client(), stack.cfg.buckets["releases"], log, device or socket.gethostname(), rotate)
    except StageError as exc:
        _fail(str(exc))
        raise
    what = "uploaded" if res["new"] else "already there (the same log was pushed before)"
    console.print(f"{res['lines']} predictions {what}: {res['uri']}", highlight=False)


@app.command()
def review(src: Annotated[Path, typer.Argument(metavar="CSV_OR_FOLDER", help="a CSV (image, verdict, defect_type"
                                               "[, category, note]) or a folder SRC/<class>/*.png")],
           category: Annotated[str | None, typer.Option(help="the category of every image (default: the CSV's "
                                                        "column, or the dataset's only category)")] = None,
           reviewer: Annotated[str | None, typer.Option(help="who reviewed (default: $EDGEQA_REVIEWER, then the "
                                                        "login name)")] = None,
           push: Annotated[bool, typer.Option(help="push the batch to the DVC remote (a nightly checkout pulls "
                                              "it from there)")] = True,
           commit: Annotated[bool, typer.Option(help="git commit the batch's .dvc file (only that)")] = True
           ) -> None:
    """Add human verdicts on images from the line to the `labelled` pool as a new DVC data version: one batch
    under ingest.reviews (dvc add, dvc push, git commit of its .dvc file). Every image is checked first (decodes,
    mode and size, verdict, type, category, not already in the dataset or an earlier review); on any problem
    nothing is written. The next `dvc repro` (or nightly run) ingests the batch into `labelled`; no existing
    image changes split."""
    from edgeqa.config import ParamsError, load_params
    from edgeqa.data import review as rv
    from edgeqa.errors import StageError

    root = project_root()
    try:
        params = load_params(root / "params.yaml")
    except ParamsError as exc:
        _fail(str(exc))
        raise
    if not params.ingest.reviews:
        _fail("ingest.reviews is not set in params.yaml: name the folder review batches go to (data/reviews)")
    reviews = root / str(params.ingest.reviews)
    if push:
        _stack_up()  # the DVC remote is the stack's S3 (or the external one)
    try:
        res = rv.add(src, params.ingest, reviews, root / params.paths.ingest_dir / "manifest.parquet", reviewer,
                     category)
    except StageError as exc:
        _fail(str(exc))
        raise
    console.print(f"review batch {res['batch']}: {res['images']} images ({res['good']} good, "
                  f"{res['defective']} defective) -> {res['path']}", highlight=False)
    try:
        t = rv.track(root, res["path"], push=push, commit=commit,
                     message=f"review {res['batch']}: {res['images']} verdicts ({res['good']} good, "
                             f"{res['defective']} defective) for {params.ingest.dataset}")
    except StageError as exc:  # the batch is complete on disk; say how to finish or withdraw it
        rel = res["path"].relative_to(root)
        _fail(f"{exc}\nthe batch is written in full at {rel} but not (fully) tracked: finish with `dvc add {rel}`, "
              f"`dvc push {rel}.dvc` and `git commit {rel}.dvc {rel.parent}/.gitignore`, or withdraw it with "
              f"`rm -r {rel}` (and `dvc remove {rel}.dvc` if it was added)")
        raise
    console.print(f"tracked as {t['dvc_file']}" + (", pushed to the DVC remote" if t["pushed"] else "")
                  + (f", committed {t['commit'][:12]}" if t["commit"] else
                     f"; commit it: git add {t['dvc_file']} && git commit"), highlight=False)
    console.print("the next `dvc repro` (or nightly run) adds it to the labelled split", highlight=False)


@app.command()
def drift(device: Annotated[str | None, typer.Option(help="only this device's logs (default: all)")] = None
          ) -> None:
    """Check the prediction logs the line pushed (feedback/) for drift against what the released model
    answered on test: P(defective) (PSI, KS), the share answered defective, image sizes training never had,
    brightness and contrast, and the mean image embedding against a training sample (thresholds: ops.drift).
    Writes reports/drift/report.{json,md}; notifies through ops.notify_block on drift.
    Exit 0: no drift (or too few answers for a verdict); 3: drift."""
    root = project_root()
    _stack_up()
    flow = load_project_module(root, "flows.drift").drift
    state = flow(repo=str(root), device=device, return_state=True)
    if not state.is_completed():
        _fail(f"the drift check {state.name}: {state.message}")
    rep = state.result()
    colour = "yellow" if rep["drifted"] else "green"
    console.print(f"[{colour}]{rep['summary']}[/{colour}] (report: {root / 'reports' / 'drift' / 'report.md'})",
                  highlight=False)
    if rep["drifted"]:
        raise typer.Exit(3)


@app.command("label-fanout")
def label_fanout(workers: Annotated[int, typer.Option(min=1, help="Dask workers (processes, one thread each)")] = 2,
                 address: Annotated[str | None, typer.Option(
                     help="an existing Dask scheduler (tcp://host:8786) instead of a local cluster")] = None,
                 pin_kernels: Annotated[bool, typer.Option(
                     help="AVX2 kernels in the workers: answers identical to a single-process run")] = True,
                 ) -> None:
    """Label the pools over Dask workers: they fill the `label` stage's own resume cache, a run of whole
    batches each, then `dvc repro -s label` assembles labels.jsonl from it. Refuses while label's upstream
    stages are stale (it would label with an old teacher)."""
    root = project_root()
    _stack_up()
    flow = load_project_module(root, "flows.label_fanout").label_fanout
    state = flow(repo=str(root), workers=workers, address=address, pin_kernels=pin_kernels, return_state=True)
    if not state.is_completed():
        _fail(f"the label fan-out {state.name}: {state.message}")
    res = state.result()
    for s in res["shards"]:
        console.print(f"shard {s['shard']}: batches {s['batches'][0]}..{s['batches'][1] - 1}, {s['computed']} "
                      f"computed, {s['reused']} reused, {s['seconds']} s", highlight=False)
    lab = res.get("label", {})
    if lab:
        console.print(f"[green]label: {lab['images']} images, {lab['batches_reused']} batches from the cache, "
                      f"{lab['batches_computed']} computed[/green]", highlight=False)


def _notify_ref() -> str:
    from edgeqa.config import ParamsError, load_params

    try:
        return load_params(project_root() / "params.yaml").ops.notify_block
    except ParamsError as exc:
        _fail(str(exc))
        raise


@notify_app.command("set-webhook")
def notify_set_webhook(url: Annotated[str, typer.Argument(help="where to POST: JSON {subject, body}")]) -> None:
    """Save the webhook that the flows' completion and failure hooks call, as the Prefect block
    ops.notify_block (a custom-webhook block; the URL is kept as the block's secret, never in params)."""
    from urllib.parse import urlparse

    ref = _notify_ref()
    kind, name = ref.split("/", 1)
    if kind != "custom-webhook":
        _fail(f"ops.notify_block is {ref!r}: set-webhook saves a custom-webhook block; save a {kind} block in the "
              "Prefect UI (Blocks) under that name instead")
    if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        _fail("the webhook is an http:// or https:// URL")
    stack = _stack()
    use_stack_env(stack)
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.types import SecretDict

    CustomWebhookNotificationBlock(name="edgeqa", url="{{url}}", method="POST", secrets=SecretDict({"url": url}),
                                   json_data={"subject": "{{subject}}", "body": "{{body}}"}, headers=None,
                                   cookies=None).save(name, overwrite=True)
    console.print(f"saved the webhook as block {ref} (the URL is its secret)", highlight=False)


@notify_app.command("test")
def notify_test() -> None:
    """Send a test message through ops.notify_block."""
    stack = _stack()
    use_stack_env(stack)
    from prefect.blocks.core import Block

    ref = _notify_ref()
    try:
        block: Any = Block.load(ref)
    except (ValueError, KeyError):
        _fail(f"no block {ref} on the Prefect server; `edgeqa notify set-webhook URL` saves one")
        raise
    try:
        block.notify(body="edgeqa: a test message", subject="edgeqa: test")
    except Exception as exc:  # noqa: BLE001 - say what failed, never the URL
        _fail(f"the notification through {ref} failed: {type(exc).__name__}")
    console.print(f"sent a test message through {ref}", highlight=False)


def exp_save(root: Path) -> str:
    """`dvc exp save` of the workspace as run: the commit a release names (edgeqa.runs.exp_save)."""
    from edgeqa.errors import StageError
    from edgeqa.runs import exp_save as save

    try:
        return save(root)[1]
    except StageError as exc:
        _fail(str(exc))
        raise


if __name__ == "__main__":
    app()
