"""The Dask labelling fan-out: two LocalCluster workers (one thread each, pinned kernels) fill the `label`
stage's own cache through the flow's DaskTaskRunner; the stage then assembles labels.jsonl from that cache
without computing a batch, and the answers equal a single-process run's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from edgeqa.config import profiles
from edgeqa.teacher.label import PINNED_KERNELS, shard_batches
from flows.label_fanout import fill_with_dask

from ..conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _stage(params_file: Path, teacher: Path, manifest: Path, out: Path, metrics: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **PINNED_KERNELS}
    subprocess.run([sys.executable, "-m", "tasks.label", "--params", str(params_file), "--teacher", str(teacher),
                    "--manifest", str(manifest), "--out", str(out), "--metrics", str(metrics)],
                   check=True, env=env, capture_output=True, cwd=REPO)
    return json.loads(metrics.read_text())


def _same(a: Any, b: Any, where: str = "") -> None:
    """Strings, flags and integers equal; floats (soft targets, probabilities) within 1e-4."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, abs=1e-4), where
    else:
        assert a == b, where


def test_shards_are_contiguous_whole_batches():
    assert shard_batches(5, 2) == [range(0, 3), range(3, 5)]
    assert shard_batches(1, 2) == [range(0, 1), range(1, 1)]
    assert [i for r in shard_batches(17, 4) for i in r] == list(range(17))


def test_two_dask_workers_fill_the_stage_cache_with_the_single_process_answers(tiny_teacher, tiny_manifest,
                                                                                prefect_api, tmp_path):
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    profiles.apply("tiny", params_file, REPO)
    # the reference runs one thread too; small batches give each worker several
    profiles.set_keys({"teacher.threads": 1, "label.batch_size": 4}, params_file, "the test")
    teacher = Path(tiny_teacher["dir"])

    ref = _stage(params_file, teacher, tiny_manifest, tmp_path / "single", tmp_path / "single.json")
    n_batches = ref["batches_computed"]
    assert n_batches >= 2, "the tiny pool must span at least two batches to split it"

    out = tmp_path / "fanout"
    shards = fill_with_dask(str(params_file), str(teacher), str(tiny_manifest), str(out), workers=2)
    assert [s["shard"] for s in shards] == [0, 1]
    assert [s["batches"] for s in shards] == [[r.start, r.stop] for r in shard_batches(n_batches, 2)]
    assert sum(s["computed"] for s in shards) == n_batches and all(s["computed"] for s in shards)
    assert sorted(p.name for p in out.glob("cache/*/*.jsonl")) == \
        sorted(p.name for p in (tmp_path / "single").glob("cache/*/*.jsonl")), "the stage's own cache keys"

    # the stage itself assembles the output from the filled cache, computing nothing
    m = _stage(params_file, teacher, tiny_manifest, out, tmp_path / "assembled.json")
    assert m["batches_computed"] == 0 and m["batches_reused"] == n_batches
    got = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "single" / "labels.jsonl").read_text().splitlines()]
    df = pd.read_parquet(tiny_manifest)
    assert [r["sha256"] for r in got] == list(df[df.split.isin(["labelled", "unlabelled"])].sha256)
    for g, w in zip(got, want):
        for k in ("verdict", "type", "location", "reason"):
            assert g[k] == w[k], (g["path"], k)
        _same(g, w, g["path"])

    # a second fan-out over a full cache computes nothing
    again = fill_with_dask(str(params_file), str(teacher), str(tiny_manifest), str(out), workers=2)
    assert sum(s["computed"] for s in again) == 0 and sum(s["reused"] for s in again) == n_batches


def test_the_fanout_flow_assembles_through_dvc_and_refuses_a_stale_teacher(tiny_repo, prefect_api, tmp_path):
    """On a reproduced tiny project: the flow's workers find every batch cached, `dvc repro -s label` leaves
    the stage as DVC recorded it, and a changed teacher param (teacher_sft stale) stops the flow before any
    worker starts, naming the stage."""
    from flows.label_fanout import label_fanout

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    cached = len(list(repo.glob("data/labels/cache/*/*.jsonl")))
    assert cached >= 1
    res = label_fanout(repo=str(repo), workers=2)
    assert sum(s["computed"] for s in res["shards"]) == 0
    assert sum(s["reused"] for s in res["shards"]) == cached
    st = subprocess.run(["dvc", "status", "--json", "--with-deps", "label"], cwd=repo, capture_output=True,
                        text=True, check=True)
    assert json.loads(st.stdout or "{}") == {}, f"label and its upstream are as DVC recorded: {st.stdout}"

    profiles.set_keys({"teacher.seed": 1}, repo / "params.yaml", "the test")
    state = label_fanout(repo=str(repo), workers=2, return_state=True)
    assert state.is_failed()
    msg = str(state.message) + repr(state.result(raise_on_failure=False))
    assert "label's upstream stages are stale: teacher_sft" in msg and "dvc repro teacher_sft" in msg
