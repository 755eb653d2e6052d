"""Shared fixtures. One real SeaweedFS + one real Prefect server per test session, on free loopback ports
in a temp dir (never a second ephemeral Prefect server), and session-scoped copies of the repository with
the `tiny` profile applied, so later issues reuse one tiny pipeline run instead of each running their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)


def stage_names(repo: Path = REPO) -> set[str]:
    """The stages of dvc.yaml, foreach entries expanded over the list params.yaml gives them."""
    import yaml

    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    out: set[str] = set()
    for name, s in stages.items():
        if "foreach" in s:
            key = s["foreach"].removeprefix("${").removesuffix("}")
            cur = params
            for part in key.split("."):
                cur = cur[part]
            out |= {f"{name}@{item}" for item in cur}
        else:
            out.add(name)
    return out


STAGES = frozenset(stage_names())


def mtile_root() -> Path:
    """The magnetic-tile dataset, located the one way the project does it (EDGEQA_MTILE_ROOT, else the default)."""
    from edgeqa.config.datasets import dataset_path

    return dataset_path("mtile", REPO)


def pytest_configure(config: pytest.Config) -> None:
    # Before anything imports prefect: no analytics, and a private Prefect home for the session.
    home = Path(os.environ.get("EDGEQA_TEST_HOME") or _mkd())
    os.environ.update({"PREFECT_HOME": str(home / "prefect-client"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
                       "PREFECT_LOGGING_LEVEL": "INFO"})
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")


def _mkd() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="edgeqa-test-")


@pytest.fixture(scope="session")
def params():
    from edgeqa.config import load_params

    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory):
    """The real params.yaml with the tiny profile written in, exactly as `edgeqa profile apply tiny` does."""
    from edgeqa.config import load_params, profiles

    d = tmp_path_factory.mktemp("tinyparams")
    p = d / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    profiles.apply("tiny", p, REPO)
    return load_params(p)


@pytest.fixture(scope="session")
def tiny_synth(tiny_params, tmp_path_factory) -> Path:
    """A tiny synthetic MVTec-layout dataset (generated once per session)."""
    from edgeqa.data import synth

    out = tmp_path_factory.mktemp("tinysynth") / "synth"
    synth.run(tiny_params.synth, out)
    return out


@pytest.fixture(scope="session")
def tiny_manifest(tiny_params, tiny_synth, tmp_path_factory) -> Path:
    from edgeqa.data import ingest

    out = tmp_path_factory.mktemp("tinyingest")
    cfg = tiny_params.ingest.model_copy(update={"root": str(tiny_synth)})
    ingest.run(cfg, tiny_synth, out)
    return out / "manifest.parquet"


@pytest.fixture(scope="session")
def base_lm_dir(params, tmp_path_factory) -> Path:
    """The teacher's LM converted once per session from its GGUF wheel (the real `convert` stage's function)."""
    from edgeqa.vlm import convert

    out = tmp_path_factory.mktemp("base_lm") / "base_lm"
    convert.run(params.base_lm, out)
    return out


@pytest.fixture(scope="session")
def base_lm(base_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(base_lm_dir).eval(), AutoTokenizer.from_pretrained(base_lm_dir)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_params, tiny_manifest, base_lm_dir, tmp_path_factory):
    """The local teacher trained once per session by the real teacher_sft stage on the tiny data."""
    d = tmp_path_factory.mktemp("teacher")
    res = run_teacher_sft(tiny_params, base_lm_dir, tiny_manifest, d / "teacher", d / "metrics.json",
                          d / "report.md", d / "live")
    return {"dir": d / "teacher", "metrics": res, "report": d / "report.md", "live": d / "live"}


@pytest.fixture(scope="session")
def tiny_labels(tiny_params, tiny_teacher, tiny_manifest, tmp_path_factory) -> Path:
    """The real label stage's output for the tiny teacher (labelled + unlabelled pools)."""
    out = tmp_path_factory.mktemp("labels") / "labels"
    run_label(tiny_params, tiny_teacher["dir"], tiny_manifest, out)
    return out


# The stage functions with the params sections their tasks/<stage>.py passes, for tests that hold a whole Params.
def run_teacher_sft(p, base_lm_dir, manifest, out, metrics=None, report=None, live=None):
    from edgeqa.teacher import sft

    return sft.run(p.teacher, p.ingest.defect_types, base_lm_dir, manifest, out, metrics, report, live)


def run_label(p, teacher_dir, manifest, out, metrics=None, report=None):
    from edgeqa.teacher import label

    t = p.teacher
    return label.run(p.label, t.max_reason_tokens, t.top_k, t.threads, teacher_dir, manifest, out, metrics, report)


def run_evaluate(p, model, model_dir, manifest, out, metrics=None, report=None):
    from edgeqa.evaluation import evaluate

    return evaluate.run(p.evaluate, list(p.ingest.mask_facts.size_classes), model, model_dir, manifest, out,
                        metrics, report)


def run_sft(p, role, base_lm_dir, teacher_dir, manifest, labels, features, out, metrics=None, report=None, live=None):
    """The sft/baseline stage function with the sections tasks/sft.py passes it."""
    from edgeqa.student import sft

    return sft.run(p.sft, p.student, p.ingest.defect_types, p.ingest.mask_facts, role, base_lm_dir, teacher_dir,
                   manifest, labels, features, out, metrics, report, live)


def train_students(p, base_lm_dir, teacher_dir, manifest, labels, root: Path) -> dict:
    """student_features, baseline, sft and distill (the real stage functions) into `root`."""
    from edgeqa.student import distill
    from edgeqa.student import features as student_features

    feats = root / "features"
    student_features.run(p.student, manifest, feats)
    out: dict = {"features": feats}
    for role in ("baseline", "sft"):
        out[f"{role}_metrics"] = run_sft(p, role, base_lm_dir, teacher_dir, manifest, labels, feats, root / role,
                                         root / f"{role}.json", root / f"{role}.md", root / f"{role}_live")
        out[role] = root / role
    out["distill_metrics"] = distill.run(p.distill, p.student, root / "sft", base_lm_dir, teacher_dir, manifest,
                                         labels, feats, root / "distill", root / "distill.json",
                                         root / "distill.md", root / "distill_live")
    out["distill"] = root / "distill"
    return out


@pytest.fixture(scope="session")
def tiny_students(tiny_params, base_lm_dir, tiny_teacher, tiny_manifest, tiny_labels, tmp_path_factory) -> dict:
    """The three tiny-profile students, trained once per session by the real stage functions."""
    return train_students(tiny_params, base_lm_dir, tiny_teacher["dir"], tiny_manifest, tiny_labels,
                          tmp_path_factory.mktemp("students"))


@pytest.fixture(scope="session")
def tiny_pruned(tiny_params, tiny_students, tiny_manifest, tiny_labels, tmp_path_factory) -> dict:
    """`prune.run` on the tiny students, laid out as dvc.yaml does: models/<student>, reports/<student>/metrics.json."""
    from edgeqa.compress import prune

    root = tmp_path_factory.mktemp("pruned")
    (root / "models").mkdir()
    for name in ("baseline", "sft", "distill"):
        (root / "models" / name).symlink_to(tiny_students[name])
        (root / "reports" / name).mkdir(parents=True)
        (root / "reports" / name / "metrics.json").write_text(json.dumps(tiny_students[f"{name}_metrics"]))
    res = prune.run(tiny_params.prune, tiny_params.student, root / "models", root / "reports", tiny_manifest,
                    tiny_labels, tiny_students["features"], root / "models" / "pruned", root / "prune.json",
                    root / "prune.md", root / "prune_live")
    return {"dir": root / "models" / "pruned", "res": res, "report": root / "prune.md", "root": root,
            "live": root / "prune_live"}


# ------------------------------------------------------------------------------------ the real stack
@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Iterator:
    """SeaweedFS + Prefect server on free ports in a temp state dir, shared by every integration test."""
    from edgeqa.stack import PORT_KEYS, Stack, StackConfig, free_ports

    base = StackConfig.load(REPO, env={})
    ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    cfg = StackConfig(state_dir=tmp_path_factory.mktemp("stack"), ports=ports, buckets=base.buckets,
                      prefect_block=base.prefect_block)
    st = Stack(cfg)
    try:
        try:
            st.up()
        except Exception as exc:  # make a start-up failure self-explanatory in CI output
            logs = {p.name: p.read_text(errors="replace")[-3000:] for p in cfg.path("logs").glob("*.log")}
            raise RuntimeError(f"test stack failed to start on ports {cfg.ports}: {exc}\nlogs: {logs}") from exc
        yield st
    finally:
        st.down()


@pytest.fixture(scope="session")
def prefect_api(stack) -> Iterator[str]:
    """Point this process's Prefect client at the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ["PREFECT_API_URL"] = stack.cfg.prefect_api_url
    with temporary_settings(updates={PREFECT_API_URL: stack.cfg.prefect_api_url}):
        yield stack.cfg.prefect_api_url
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # send queued logs while the server is still up


def copy_repo(dst: Path, profile: str | None = "tiny") -> Path:
    """A working copy of the project as its own git+DVC repo, with `profile` written into its params.yaml."""
    from edgeqa.config import profiles
    from edgeqa.project import copy_worktree

    copy_worktree(dst, REPO)
    if profile:
        profiles.apply(profile, dst / "params.yaml", dst)
    return dst


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["dvc", *args], cwd=repo, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory, stack) -> Path:
    """A repo copy with the tiny profile, reproduced once with bare `dvc repro` (no Prefect), remote = test S3.
    Each stage process records the params it reads (EDGEQA_TRACE_PARAMS) into `<repo>/../params-trace`."""
    repo = copy_repo(tmp_path_factory.mktemp("tinyrepo") / "repo")
    stack.configure_dvc(repo)
    r = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, "EDGEQA_TRACE_PARAMS": str(repo.parent / "params-trace")})
    if r.returncode != 0:
        raise AssertionError(f"dvc repro failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return repo


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory, stack, prefect_api):
    """One run of the real `edgeqa-pipeline` flow on a fresh tiny repo copy, results persisted to S3."""
    from flows.pipeline import pipeline  # tests run from the project root: flows is a project module

    repo = copy_repo(tmp_path_factory.mktemp("flowrepo"))
    stack.configure_dvc(repo)
    flow = pipeline.with_options(result_storage=f"s3-bucket/{stack.cfg.prefect_block}", persist_result=True)
    state = flow(repo=str(repo), push=True, bench_file="reports/bench/pipeline.json", return_state=True)
    return {"repo": repo, "state": state, "id": state.state_details.flow_run_id}
