"""`dvc push` then `dvc pull` through the real S3 remote."""

import shutil
import subprocess

import pytest

from ..conftest import dvc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_push_then_pull_round_trip(tiny_repo, tmp_path):
    """A copy of the reproduced tiny repo pushes, loses its cache and every DVC output, and pulls them back from S3
    to the same bytes and a clean `dvc status`. It works on a copy: the session's tiny_repo is shared by later tests,
    and git-tracked files under data/ (data/reviews/README.md) come back from git, as in a fresh clone."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    manifest = repo / "data" / "ingest" / "manifest.parquet"
    before = manifest.read_bytes()
    dvc(repo, "push")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    subprocess.run(["git", "checkout", "--", "data"], cwd=repo, check=True)
    assert not manifest.exists()
    dvc(repo, "pull")
    assert manifest.read_bytes() == before
    assert (repo / "data" / "synth").is_dir()
    st = dvc(repo, "status", "--json")
    assert st.stdout.strip() in ("{}", ""), st.stdout
    assert (tiny_repo / "data" / "reviews" / "README.md").is_file()  # the shared repo is untouched
