"""`dvc push` then `dvc pull` through the real S3 remote."""

import shutil

import pytest

from ..conftest import dvc

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_push_then_pull_round_trip(tiny_repo):
    manifest = tiny_repo / "data" / "ingest" / "manifest.parquet"
    before = manifest.read_bytes()
    dvc(tiny_repo, "push")
    shutil.rmtree(tiny_repo / ".dvc" / "cache")
    shutil.rmtree(tiny_repo / "data")
    dvc(tiny_repo, "pull")
    assert manifest.read_bytes() == before
    assert (tiny_repo / "data" / "synth").is_dir()
    st = dvc(tiny_repo, "status", "--json")
    assert st.stdout.strip() in ("{}", ""), st.stdout
