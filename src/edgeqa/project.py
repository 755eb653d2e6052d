"""The user's project: found from the current directory (walking up to dvc.yaml) or named with --project.

The CLI acts on that project, never on the folder edgeqa was installed from. Prefect flows are project files
(`flows/` beside dvc.yaml), imported from the project root at run time, so the library never imports them
statically.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

MARKER = "dvc.yaml"


class ProjectError(RuntimeError):
    """No edgeqa project where one was expected; the message says where it looked."""


def find_project(start: Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: the current directory) that holds dvc.yaml."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / MARKER).is_file():
            return d
    raise ProjectError(f"no edgeqa project at or above {here}: no {MARKER} found. Run edgeqa inside a project "
                       "checkout, or pass --project DIR")


def load_project_module(project: Path, module: str) -> ModuleType:
    """Import a project module such as `flows.pipeline` from `project` (put first on sys.path)."""
    root = str(Path(project).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    mod = importlib.import_module(module)
    origin = Path(mod.__file__ or "").resolve()
    if not origin.is_relative_to(root):
        raise ProjectError(f"{module} was imported from {origin}, not from the project {root}; another copy shadows "
                           "it on sys.path")
    return mod


def copy_worktree(dst: Path, src: Path) -> Path:
    """Copy tracked and untracked-not-ignored files of `src` (no outputs, no DVC cache) into a new git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=src, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (src / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / f, dst / f)
    git = ["git", "-c", "user.email=copy@example.invalid", "-c", "user.name=edgeqa"]
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-qm", "working copy"], cwd=dst, check=True)
    return dst
