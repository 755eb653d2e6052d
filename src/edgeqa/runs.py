"""Pipeline runs outside a person's terminal: the checkout a scheduled run works in (never the user's working
tree), the names runs carry, and `dvc exp save`, which turns a finished run into the commit a release names.

The flows call these; so does `edgeqa run`. Nothing here imports Prefect.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from edgeqa.errors import StageError

# where git has no identity configured (a CI machine, a worker's service account), commits carry the run's own
RUN_IDENTITY = {"GIT_AUTHOR_NAME": "edgeqa run", "GIT_AUTHOR_EMAIL": "edgeqa@localhost",
                "GIT_COMMITTER_NAME": "edgeqa run", "GIT_COMMITTER_EMAIL": "edgeqa@localhost"}


def _env() -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for k, v in RUN_IDENTITY.items():
        env.setdefault(k, v)
    return env


def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise StageError(f"git {' '.join(args)} in {repo} failed: {(r.stderr or r.stdout).strip()[-800:]}")
    return r.stdout.strip()


def commit_of(repo: Path, ref: str = "HEAD") -> str:
    """The commit `ref` names in `repo` (a branch, tag, sha, or HEAD)."""
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=repo,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise StageError(f"{repo}: {ref!r} names no commit (ops.nightly.ref takes a branch, tag, sha or HEAD)")
    return r.stdout.strip()


def checkout(src: Path, ref: str, root: Path) -> tuple[Path, str]:
    """A clone of `src` at `ref` under `root`, one folder per commit: a later run of the same commit reuses it
    (its DVC outputs and cache stay, and params.yaml and dvc.lock return to the commit's), a new commit gets
    its own. The clone is made under a temporary name and renamed when complete. (path, commit)."""
    src = Path(src).resolve()
    sha = commit_of(src, ref)
    dest = root / sha[:12]
    if (dest / ".git").is_dir() and commit_of(dest) == sha:
        git(dest, "checkout", "--quiet", sha, "--", ".")  # tracked files as committed; outputs stay
        return dest, sha
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{sha[:12]}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    git(root, "clone", "--quiet", "--no-checkout", str(src), str(tmp))
    git(tmp, "checkout", "--quiet", "--detach", sha)
    shutil.rmtree(dest, ignore_errors=True)  # a broken earlier attempt
    tmp.replace(dest)
    return dest, sha


def short_head(repo: Path) -> str:
    """HEAD's short hash, with `+dirty` when tracked files differ from it (what `edgeqa run` runs)."""
    try:
        sha = commit_of(repo)[:7]
    except StageError:
        return "nogit"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":(exclude).dvc/tmp"], cwd=repo,
                           capture_output=True).returncode != 0
    return sha + ("+dirty" if dirty else "")


def data_fingerprint(repo: Path) -> str:
    """8 hex digits naming the data a run trains on: the `ingest` stage's outputs as dvc.lock records them (the
    manifest holds every image's hash and split). `new` before a first run."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return "new"
    stage = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get("ingest")
    if not stage:
        return "new"
    outs = sorted((o["path"], o.get("md5", "")) for o in stage.get("outs", []))
    return hashlib.sha256(json.dumps(outs).encode()).hexdigest()[:8]


def profile_of(repo: Path) -> str:
    """The first profile params.yaml already holds entirely (what a plain `edgeqa run` runs), else `custom`."""
    from edgeqa.config import ParamsError
    from edgeqa.config.profiles import available, changed_keys

    for name in available(repo):
        try:
            if not changed_keys(name, repo / "params.yaml", repo):
                return name
        except ParamsError:
            continue
    return "custom"


def run_name(profile: str, repo: Path, commit: str | None = None) -> str:
    """`<profile>-data-<fingerprint>-<short git hash>`: what a flow run is called in the Prefect UI."""
    return f"{profile}-data-{data_fingerprint(repo)}-{commit[:7] if commit else short_head(repo)}"


def exp_save(root: Path) -> tuple[str, str]:
    """`dvc exp save` of the workspace as run (params.yaml, dvc.lock, code): the commit a release names. An
    experiment with the same tree saved before is reused, and a workspace equal to HEAD is HEAD, so the same run
    is the same release version. (experiment name, commit)."""
    env = _env()

    def exps() -> dict[str, str]:  # ref name -> commit
        out = git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/")
        pairs = (ln.split()[:2] for ln in out.splitlines() if ln.strip())
        return {ref: ct for ref, ct in pairs if not ref.startswith("refs/exps/exec/")}  # DVC's own EXEC_* refs

    status = git(root, "status", "--porcelain", "--untracked-files=normal", "--", ".", ":(exclude).dvc/tmp")
    if not status:  # the run changed no tracked file (dvc.lock and params.yaml as committed): HEAD is the run
        return "HEAD", commit_of(root)
    before = exps()
    # a random tail: two runs saved within one second (the unit test does) must not collide on the name
    name = f"run-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    r = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "-n", name, "-m", "edgeqa run, as released"],
                       cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise StageError(f"dvc exp save in {root} failed: {(r.stderr or r.stdout).strip()[-1500:]}")
    new = {ref: ct for ref, ct in exps().items() if ref.endswith(f"/{name}")}
    if not new:
        raise StageError(f"dvc exp save made no ref for experiment {name} in {root}")
    sha = next(iter(new.values()))
    for ref, old in sorted(before.items(), key=lambda kv: kv[1]):  # saved already (DVC's .dvc/tmp aside): reuse
        if subprocess.run(["git", "diff", "--quiet", old, sha, "--", ".", ":(exclude).dvc/tmp"], cwd=root,
                          capture_output=True).returncode == 0:
            subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", name], cwd=root, env=env,
                           capture_output=True)
            return ref.rsplit("/", 1)[-1], old
    return name, sha


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage for the run's table artifact: ran (executed its command) or reused (DVC skipped it or
    restored its outputs from the run cache)."""
    return [{"stage": r["stage"], "seconds": r["seconds"], "ran": r.get("ran", False)} for r in results]
