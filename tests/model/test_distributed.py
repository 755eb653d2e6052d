"""Student training placement (edgeqa.distributed): the `baseline` stage under torchrun with two gloo processes
on the CPU trains the same student as one process that cuts each batch into the same two shards; the device
setting is checked; and, where a GPU exists, CUDA trains the same student as the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeqa.config import profiles
from edgeqa.distributed import Runtime, resolve
from edgeqa.errors import StageError

from ..conftest import REPO

pytestmark = [pytest.mark.slow]
VOLATILE = {"seconds", "feature_seconds", "placement"}


def _baseline(tmp_path, name, overrides, base_lm_dir, tiny_teacher, tiny_manifest, tiny_labels, tiny_students,
              tiny_params_file):
    """`python -m tasks.sft --role baseline` exactly as dvc.yaml runs it, with `overrides` written into a copy of
    the tiny params (as `dvc exp run -S` would)."""
    params = tmp_path / f"{name}.yaml"
    shutil.copy(tiny_params_file, params)
    profiles.set_keys(overrides, params)
    out = tmp_path / name
    cmd = [sys.executable, "-m", "tasks.sft", "--role", "baseline", "--params", str(params), "--base-lm",
           str(base_lm_dir), "--teacher", str(tiny_teacher["dir"]), "--manifest", str(tiny_manifest), "--labels",
           str(tiny_labels), "--features", str(tiny_students["features"]), "--out", str(out), "--metrics",
           str(tmp_path / f"{name}.json"), "--report", str(tmp_path / f"{name}.md")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return out, json.loads((tmp_path / f"{name}.json").read_text()), r.stderr


@pytest.fixture(scope="module")
def tiny_params_file(tiny_params, tmp_path_factory):
    p = tmp_path_factory.mktemp("distparams") / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    profiles.apply("tiny", p, REPO)
    return p


def _weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _same_metrics(a, b, rel: float = 1e-4, path: str = "") -> None:
    """Equal metrics, floats within `rel` (the two layouts sum gradients in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a.keys() - VOLATILE:
            _same_metrics(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_metrics(x, y, rel, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_torchrun_two_gloo_processes_train_the_student_one_process_trains(
        tmp_path, base_lm_dir, tiny_teacher, tiny_manifest, tiny_labels, tiny_students, tiny_params_file):
    common = {"student.micro_batches": 2, "student.threads": 1, "student.device": "cpu"}
    fx = (base_lm_dir, tiny_teacher, tiny_manifest, tiny_labels, tiny_students, tiny_params_file)
    one, m1, _ = _baseline(tmp_path, "one", {**common, "student.processes": 1}, *fx)
    two, m2, log2 = _baseline(tmp_path, "two", {**common, "student.processes": 2}, *fx)
    assert m1["placement"] == {"device": "cpu", "processes": 1, "micro_batches": 2}
    assert m2["placement"] == {"device": "cpu", "processes": 2, "micro_batches": 2}
    assert "process 2 of 2" in log2 and "process 1 of 2" in log2  # both ranks trained
    assert m1["steps_run"] == m2["steps_run"] > 0
    _same_metrics(m1, m2)
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys()
    worst = max(float(np.max(np.abs(w1[k].astype(np.float64) - w2[k]))) for k in w1)
    assert worst < 1e-4, worst
    # and training did move the weights: the comparison is not between two untouched initialisations
    w0 = _weights(tiny_students["baseline"])
    assert any(not np.array_equal(w0[k], w1[k]) for k in w1)


def test_shards_cover_the_batch_once_across_processes():
    for world in (1, 2, 4):
        seen = []
        for rank in range(world):
            n, mine = Runtime(torch.device("cpu"), rank, world).shards(10, 2)
            assert n == max(world, 2)
            seen += [i for _, pos in mine for i in pos]
        assert sorted(seen) == list(range(10))
    with pytest.raises(StageError, match="student.micro_batches 3 is not a multiple of the 2 torchrun processes"):
        Runtime(torch.device("cpu"), 0, 2).shards(10, 3)
    n, mine = Runtime(torch.device("cpu"), 0, 1).shards(2, 4)  # an epoch's last batch: some shards empty
    assert n == 4 and [pos for _, pos in mine] == [[], [0], [1], []]


def test_the_device_setting_is_checked():
    assert resolve("cpu") == torch.device("cpu")
    assert resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(StageError, match="allowed: auto, cpu, cuda"):
        resolve("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(StageError, match="student.device: cuda, but torch sees no CUDA device"):
            resolve("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_trains_the_student_the_cpu_trains(tmp_path, base_lm_dir, tiny_teacher, tiny_manifest, tiny_labels,
                                                 tiny_students, tiny_params_file):
    fx = (base_lm_dir, tiny_teacher, tiny_manifest, tiny_labels, tiny_students, tiny_params_file)
    cpu, mc, _ = _baseline(tmp_path, "cpu", {"student.device": "cpu"}, *fx)
    gpu, mg, _ = _baseline(tmp_path, "gpu", {"student.device": "cuda"}, *fx)
    assert mg["placement"]["device"].startswith("cuda")
    assert mg["steps_run"] == mc["steps_run"]
    # CUDA kernels round differently (and drop-connect draws from another generator): close, not equal
    assert mg["val_auroc"] == pytest.approx(mc["val_auroc"], abs=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA device")
def test_teacher_sft_refuses_cuda_without_a_device_before_writing(tiny_params, tmp_path):
    """teacher.device has the student's rule, named by its own key; nothing is written."""
    from edgeqa.teacher import sft

    cfg = tiny_params.teacher.model_copy(update={"device": "cuda"})
    with pytest.raises(StageError, match="teacher.device: cuda, but torch sees no CUDA device"):
        sft.run(cfg, tiny_params.ingest.defect_types, tmp_path / "lm", tmp_path / "manifest.parquet",
                tmp_path / "teacher", tmp_path / "m.json")
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_trains_the_teacher_the_cpu_trains(tiny_params, tiny_teacher, tiny_manifest, base_lm_dir, tmp_path):
    """teacher_sft with teacher.device cuda: the same epochs and a close LM-alone val AUROC to the session's CPU
    teacher, and a teacher folder the CPU labeller loads (saved from the CPU)."""
    from edgeqa.teacher import sft
    from edgeqa.teacher.local import LocalTeacher

    cfg = tiny_params.teacher.model_copy(update={"device": "cuda"})
    res = sft.run(cfg, tiny_params.ingest.defect_types, base_lm_dir, tiny_manifest, tmp_path / "teacher")
    cpu = tiny_teacher["metrics"]
    assert res["epochs_run"] == cpu["epochs_run"]
    assert res["val_auroc_lm"] == pytest.approx(cpu["val_auroc_lm"], abs=0.1)
    import pandas as pd

    paths = list(pd.read_parquet(tiny_manifest).path.head(2))
    answers = LocalTeacher(tmp_path / "teacher").predict_paths(paths, max_reason_tokens=4)
    assert len(answers) == 2
