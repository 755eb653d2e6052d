"""A working copy of the project as its own git + DVC repo (for benchmarks and tests from a clean state)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from flows.stack import REPO


def copy_worktree(dst: Path, src: Path = REPO) -> Path:
    """Copy tracked and untracked-not-ignored files of `src` (no outputs, no DVC cache) and commit them."""
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
