"""The house rules, checked on the real code: imports point down (import-linter contracts), each stage's code
deps in dvc.yaml cover its import closure, the model list is written once, one Answerer interface, and the
runtime's preprocessing is the training side's."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO, VENV_BIN

PACKAGE_ROOTS = {"edgeqa": REPO / "src", "edgeqa_runtime": REPO / "runtime" / "src", "tasks": REPO}


def test_import_contracts_hold():
    """flows/ and tasks/ -> edgeqa -> edgeqa_runtime; tasks never import each other; the runtime imports no
    torch (lint-imports reads [tool.importlinter] in pyproject.toml)."""
    r = subprocess.run([str(Path(VENV_BIN) / "lint-imports")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "KEPT" in r.stdout


def _file_of(module: str) -> Path:
    base = PACKAGE_ROOTS[module.split(".")[0]] / module.replace(".", "/")
    return base / "__init__.py" if (base / "__init__.py").is_file() else base.with_suffix(".py")


def _inert(path: Path) -> bool:
    """A module that can change no stage's behaviour: a docstring and at most `__version__`."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id == "__version__"
                                                for t in node.targets):
            continue
        return False
    return True


def import_closure(module: str) -> set[str]:
    """Project files a module imports, directly or not, function-level imports included, plus the packages
    (`__init__.py`) Python runs on the way; inert package files left out."""
    import grimp

    sys.path.insert(0, str(REPO))
    graph = grimp.build_graph("edgeqa", "edgeqa_runtime", "tasks", include_external_packages=False)
    mods = set(graph.find_upstream_modules(module)) | {module}
    for m in list(mods):
        parts = m.split(".")
        mods |= {".".join(parts[:i]) for i in range(1, len(parts))}
    files = {_file_of(m) for m in mods}
    return {f.relative_to(REPO).as_posix() for f in files if not _inert(f)}


def _stage_code_deps() -> dict[str, tuple[str, list[str]]]:
    """dvc.yaml stage -> (its tasks module, its deps that are project code paths)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, s in stages.items():
        body = s.get("do", s)
        module = body["cmd"].split("python -m ", 1)[1].split()[0]
        code = [d for d in body["deps"] if d.startswith(("src/", "runtime/", "tasks/"))]
        out[name] = (module, code)
    return out


def test_each_stage_lists_its_import_closure_as_deps(capsys):
    missing, extras = {}, {}
    for name, (module, deps) in _stage_code_deps().items():
        need = import_closure(module)
        covered = {f for f in need if any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)}
        if need - covered:
            missing[name] = sorted(need - covered)
        unused = [d for d in deps if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in need)]
        if unused:
            extras[name] = unused
    with capsys.disabled():
        print(f"\ndvc.yaml code deps no stage import needs (to judge): {extras or 'none'}")
    assert not missing, f"dvc.yaml misses code a stage imports: {missing}"


def test_the_model_list_is_written_once():
    """evaluate.models in params.yaml; dvc.yaml loops over it, retention reads it; no code lists them again."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    models = params["evaluate"]["models"]
    assert models[:2] == ["teacher", "baseline"]
    assert "foreach: ${evaluate.models}" in (REPO / "dvc.yaml").read_text()
    lists = []
    for f in [*REPO.glob("src/**/*.py"), *REPO.glob("runtime/src/**/*.py"), *REPO.glob("tasks/*.py"),
              *REPO.glob("flows/*.py"), REPO / "dvc.yaml", REPO / "tests" / "conftest.py"]:
        text = f.read_text()
        for names in (models, models[1:]):
            for quote in ('"', "'"):
                if ", ".join(f"{quote}{m}{quote}" for m in names) in text:
                    lists.append(f.relative_to(REPO).as_posix())
    assert not lists, f"the model list is written out again in {sorted(set(lists))}"


def test_every_answerer_has_the_same_interface():
    from edgeqa.answerer import Answerer
    from edgeqa.student.model import Student
    from edgeqa.teacher.backends import HFTeacher, OpenAITeacher
    from edgeqa.teacher.local import LocalTeacher
    from edgeqa_runtime.session import OrtStudent

    want = inspect.signature(Answerer.predict_paths)
    for cls in (LocalTeacher, HFTeacher, OpenAITeacher, Student, OrtStudent):
        got = inspect.signature(cls.predict_paths)
        assert list(got.parameters) == list(want.parameters), cls.__name__
        for name, p in want.parameters.items():
            assert got.parameters[name].default == p.default, (cls.__name__, name)
        for method in ("schema", "parameters", "usage"):
            assert callable(getattr(cls, method, None)), (cls.__name__, method)


def test_runtime_preprocessing_is_the_training_sides(tiny_synth):
    """Training's torch input and the edge runtime's numpy input are the same numbers, bit for bit."""
    import numpy as np

    from edgeqa.vlm.vision import to_tensor
    from edgeqa_runtime.preprocess import IMAGENET_MEAN, pixels

    paths = sorted(tiny_synth.rglob("*.png"))[:4]
    x = to_tensor(paths, 96).numpy()
    y = pixels(paths, 96)
    assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y)
    # and the arithmetic is ImageNet normalisation of the bilinear resize
    from PIL import Image

    with Image.open(paths[0]) as im:
        raw = np.asarray(im.convert("RGB").resize((96, 96), Image.Resampling.BILINEAR), np.float32) / 255.0
    assert np.allclose(y[0, 0], (raw[..., 0] - IMAGENET_MEAN[0]) / 0.229, atol=1e-6)


@pytest.mark.slow
def test_the_cli_acts_on_the_project_of_the_current_directory(tmp_path):
    """One installed `edgeqa`, run inside a second clone, changes that clone and leaves this checkout alone."""
    from edgeqa.project import copy_worktree

    other = copy_worktree(tmp_path / "other", REPO)
    mine = (REPO / "params.yaml").read_bytes()
    edgeqa = str(Path(VENV_BIN) / "edgeqa")
    try:
        r = subprocess.run([edgeqa, "profile", "apply", "tiny"], cwd=other / "tasks", capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "synth.image_size: 256 -> 128" in r.stdout
        assert yaml.safe_load((other / "params.yaml").read_text())["synth"]["image_size"] == 128
        assert (REPO / "params.yaml").read_bytes() == mine, "the install folder's params.yaml is untouched"
        r = subprocess.run([edgeqa, "--project", str(other), "profile", "apply", "demo"], cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0 and yaml.safe_load((other / "params.yaml").read_text())["synth"]["image_size"] == 256
        r = subprocess.run([edgeqa, "profile", "list"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 2 and "no edgeqa project at or above" in r.stdout + r.stderr
    finally:
        if (REPO / "params.yaml").read_bytes() != mine:
            (REPO / "params.yaml").write_bytes(mine)
