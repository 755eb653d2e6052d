"""The edge bundle and the runtime: `quantize` on the tiny students (the real stage function), the manifest
that refuses a tampered bundle, `edgeqa-edge predict` / `edgeqa predict` on a folder, INT8 against FP32."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ..conftest import VENV_BIN


@pytest.fixture(scope="session")
def tiny_bundle(tiny_params, tiny_pruned, tiny_manifest) -> dict:
    """`quantize.run` on the tiny pruned student (the real stage functions, as dvc.yaml chains them)."""
    from edgeqa.compress import quantize

    root = tiny_pruned["root"]
    res = quantize.run(tiny_params.quantize, tiny_pruned["dir"], tiny_manifest, root / "edge", root / "quantize.json",
                       root / "quantize.md")
    return {"dir": root / "edge", "res": res, "report": root / "quantize.md", "root": root}


def _paths(manifest: Path, split: str, n: int) -> list[str]:
    import pandas as pd

    df = pd.read_parquet(manifest)
    return [str(p) for p in df[df.split == split].path[:n]]


def test_quantize_takes_the_pruned_student_and_writes_a_verified_bundle(tiny_bundle, tiny_pruned):
    from edgeqa_runtime.bundle import verify
    from edgeqa_runtime.files import sha256_file

    res, folder = tiny_bundle["res"], tiny_bundle["dir"]
    assert res["source"] == tiny_pruned["res"]["source"], "the bundle names the student the pruned model came from"
    assert res["lineage"]["pruning_step"] == tiny_pruned["res"]["kept_step"]
    assert res["calibration_splits"] == ["labelled"], "calibrated on training images only"
    m = verify(folder)
    assert set(m["files"]) == {"vision.onnx", "decoder.onnx", "embeddings.safetensors", "tokenizer.json",
                               "runtime.json"}
    for name, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(folder / name)
    assert m["graphs"] == res["precision"] and set(m["graphs"].values()) <= {"int8", "fp32"}
    assert (folder / "tokenizer.json").stat().st_size < 20_000, "the pruned vocabulary only, not 49k tokens"
    par = res["parity"]
    assert par["identical_answers"] == 1.0 and par["max_abs_verdict_logits"] < 1e-3
    for g, prec in res["precision"].items():  # INT8 only where its trial kept the answers
        if prec == "int8":
            assert res["trials"][g]["agreement"] >= 0.98
    rt = json.loads((folder / "runtime.json").read_text())
    assert rt["threshold"] == pytest.approx(res["threshold"]["threshold"])
    report = tiny_bundle["report"].read_text()
    assert f"Source: the pruned **{res['source']}** student" in report and "INT8 against FP32" in report


def test_bundle_answers_like_the_pytorch_student_at_the_same_threshold(tiny_bundle, tiny_manifest, tmp_path):
    """With FP32 graphs and the default threshold, the bundle's answers equal the PyTorch student's."""
    from edgeqa.student.export import export
    from edgeqa.student.model import Student
    from edgeqa_runtime.session import OrtStudent

    src = tiny_bundle["root"] / "models" / "pruned"
    export(src, tmp_path / "b")
    ort, pt = OrtStudent(tmp_path / "b"), Student(src)
    paths = _paths(tiny_manifest, "test", 6)
    for w, g in zip(pt.predict_paths(paths, 8), ort.predict_paths(paths, 8)):
        assert g["answer"] == w["answer"]
        assert g["p_defective"] == pytest.approx(w["p_defective"], abs=1e-4)
        assert g["latency_ms"] > 0


@pytest.mark.parametrize("damage", ["altered", "missing", "unlisted", "format", "api"])
def test_runtime_refuses_a_damaged_bundle_naming_the_file(tiny_bundle, tmp_path, damage):
    from edgeqa_runtime.bundle import BundleError
    from edgeqa_runtime.session import OrtStudent

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle["dir"], b)
    if damage == "altered":
        data = bytearray((b / "decoder.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (b / "decoder.onnx").write_bytes(bytes(data))
        match = r"decoder\.onnx does not match its SHA-256"
    elif damage == "missing":
        (b / "tokenizer.json").unlink()
        match = r"tokenizer\.json is listed in manifest\.json but missing"
    elif damage == "unlisted":
        (b / "extra.onnx").write_bytes(b"x")
        match = r"extra\.onnx is not listed in manifest\.json"
    else:
        m = json.loads((b / "manifest.json").read_text())
        key = "format_version" if damage == "format" else "runtime_api"
        m[key] = 99
        (b / "manifest.json").write_text(json.dumps(m))
        match = f"{key} 99; this runtime"
    with pytest.raises(BundleError, match=match):
        OrtStudent(b)


def _image_folder(tmp_path: Path, manifest: Path) -> tuple[Path, list[str]]:
    imgs = tmp_path / "line"
    imgs.mkdir()
    paths = _paths(manifest, "test", 3)
    for i, p in enumerate(paths):
        shutil.copy(p, imgs / f"img{i}{Path(p).suffix}")
    (imgs / "broken.png").write_bytes(b"not a png at all")
    return imgs, paths


@pytest.mark.parametrize("command", ["edgeqa-edge", "edgeqa"])
def test_predict_on_a_folder_writes_json_lines_and_reports_a_broken_image(tiny_bundle, tiny_manifest, tmp_path,
                                                                          command):
    from edgeqa_runtime.session import OrtStudent

    imgs, paths = _image_folder(tmp_path, tiny_manifest)
    out = tmp_path / "answers.jsonl"
    for _ in range(2):
        r = subprocess.run([str(Path(VENV_BIN) / command), "predict", "--bundle", str(tiny_bundle["dir"]),
                            str(imgs), "--out", str(out), "--log", str(tmp_path / "line" / "predictions.jsonl")],
                           capture_output=True, text=True)
    assert r.returncode == 1, r.stderr  # one image could not be read
    assert "1 of 4 images could not be read" in r.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    # the prediction log: only answered images, each with its file's hash, appended run after run
    from edgeqa_runtime.files import sha256_file
    from edgeqa_runtime.predlog import read

    log = list(read(tmp_path / "line" / "predictions.jsonl"))
    assert [Path(x["path"]).name for x in log] == ["img0.png", "img1.png", "img2.png"] * 2
    for x, rec in zip(log, recs[1:] * 2):
        assert x["image_sha256"] == sha256_file(Path(x["path"])) and x["bundle"] == rec["bundle"]
        assert (x["verdict"], x["type"], x["p_defective"]) == (rec["verdict"], rec["type"], rec["p_defective"])
    assert [Path(x["path"]).name for x in recs] == ["broken.png", "img0.png", "img1.png", "img2.png"]
    assert "cannot read the image" in recs[0]["error"]
    n_tokens = json.loads((tiny_bundle["dir"] / "runtime.json").read_text())["max_reason_tokens"]
    want = OrtStudent(tiny_bundle["dir"], 1).predict_paths(paths, n_tokens)
    for got, w in zip(recs[1:], want):
        assert {k: got[k] for k in ("verdict", "type", "location", "reason")} == {
            "verdict": w["answer"]["verdict"], "type": w["answer"]["defect_type"],
            "location": w["answer"]["location"], "reason": w["answer"]["reason"]}
        assert got["p_defective"] == pytest.approx(w["p_defective"], abs=1e-5)
        assert set(got["type_probs"]) and got["latency_ms"] > 0


def test_predict_refuses_a_tampered_bundle_with_exit_2(tiny_bundle, tiny_manifest, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle["dir"], b)
    (b / "runtime.json").write_text((b / "runtime.json").read_text().replace('"threshold"', '"threshold" ', 1))
    imgs, _ = _image_folder(tmp_path, tiny_manifest)
    r = subprocess.run([str(Path(VENV_BIN) / "edgeqa-edge"), "predict", "--bundle", str(b), str(imgs)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "runtime.json does not match its SHA-256" in r.stderr
    assert r.stdout == "", "nothing is answered with a bundle that failed verification"


def test_a_signed_copy_predicts_on_a_device_that_trusts_its_key_and_nothing_else_does(tiny_bundle, tiny_manifest,
                                                                                      tmp_path):
    """`edgeqa sign` (key created at first use) -> `edgeqa keys public` into the device's trust file ->
    `edgeqa-edge predict --trust`. The unsigned bundle, or one signed by another key, is refused there."""
    import os

    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    for var in ("EDGEQA_SIGNING_KEY", "EDGEQA_SIGNING_KEY_FILE", "EDGEQA_TRUSTED_KEYS", "EDGEQA_TRUSTED_KEYS_FILE"):
        env.pop(var, None)
    edgeqa, edge = str(Path(VENV_BIN) / "edgeqa"), str(Path(VENV_BIN) / "edgeqa-edge")
    signed, trust = tmp_path / "signed", tmp_path / "device" / "trusted.pem"
    r = subprocess.run([edgeqa, "sign", str(tiny_bundle["dir"]), "--out", str(signed)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([edgeqa, "keys", "public", "--out", str(trust)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "BEGIN PUBLIC KEY" in trust.read_text(), r.stdout + r.stderr
    img = _paths(tiny_manifest, "test", 1)[0]

    def predict(bundle, *extra, environ=env):
        return subprocess.run([edge, "predict", "--bundle", str(bundle), img, *extra], env=environ,
                              capture_output=True, text=True)

    ok = predict(signed, "--trust", str(trust))
    assert ok.returncode == 0 and json.loads(ok.stdout)["verdict"] in ("good", "defective"), ok.stderr
    assert "NOT checked" not in ok.stderr
    assert predict(signed, environ={**env, "EDGEQA_TRUSTED_KEYS_FILE": str(trust)}).returncode == 0
    unsigned = predict(tiny_bundle["dir"], "--trust", str(trust))
    assert unsigned.returncode == 2 and "the bundle is unsigned" in unsigned.stderr and unsigned.stdout == ""
    other = tmp_path / "other.pem"
    r = subprocess.run([edgeqa, "keys", "public", "--out", str(other)],
                       env={**env, "XDG_CONFIG_HOME": str(tmp_path / "config2")}, capture_output=True, text=True)
    assert r.returncode == 0
    foreign = predict(signed, "--trust", str(other))
    assert foreign.returncode == 2 and "not among this device's trusted keys" in foreign.stderr
    loose = predict(tiny_bundle["dir"])
    assert loose.returncode == 0 and "signature of" in loose.stderr and "NOT checked" in loose.stderr
    strict = predict(tiny_bundle["dir"], "--require-signature")
    assert strict.returncode == 2 and "no trusted keys configured" in strict.stderr


def test_choose_precision_keeps_fp32_for_a_graph_that_fails_the_bar():
    from edgeqa.compress.quantize import choose_precision

    def trials(results):
        seen = []

        def trial(name, precision):
            seen.append(name)
            return {"passed": results[name][0], "agreement": results[name][1]}
        return trial, seen

    t, seen = trials({"vision": (True, 1.0), "decoder": (False, 0.9)})
    assert choose_precision(t) == {"vision": "int8", "decoder": "fp32"} and seen == ["vision", "decoder"]
    t, seen = trials({"vision": (True, 0.99), "decoder": (True, 1.0), "both": (True, 0.98)})
    assert choose_precision(t) == {"vision": "int8", "decoder": "int8"} and seen[-1] == "both"
    t, _ = trials({"vision": (True, 0.99), "decoder": (True, 1.0), "both": (False, 0.9)})
    assert choose_precision(t) == {"vision": "fp32", "decoder": "int8"}, "together they fail: the better one alone"


def test_fit_threshold_max_miss_rate_is_the_highest_threshold_within_the_rate():
    from edgeqa.compress.quantize import fit_threshold
    from edgeqa.config import ThresholdRule

    y = np.array([1] * 10 + [0] * 10)
    p = np.array([0.05, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95] + [0.1] * 5 + [0.35] * 5)
    t = fit_threshold(y, p, ThresholdRule(rule="max_miss_rate", max_miss_rate=0.1, value=0.5))
    assert t["threshold"] == 0.2 and t["val_miss_rate"] == pytest.approx(0.1)
    t = fit_threshold(y, p, ThresholdRule(rule="max_miss_rate", max_miss_rate=0.0, value=0.5))
    assert t["threshold"] == 0.05 and t["val_miss_rate"] == 0.0
    t = fit_threshold(y, p, ThresholdRule(rule="fixed", max_miss_rate=0.1, value=0.5))
    assert t["threshold"] == 0.5 and t["val_miss_rate"] == pytest.approx(0.4)


@pytest.mark.slow
def test_the_runtime_installs_alone_without_torch_and_predicts(tiny_bundle, tiny_manifest, tmp_path):
    """The runtime distribution into a new venv (no torch, no edgeqa), then `edgeqa-edge predict` there."""
    from ..conftest import REPO

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    src = tmp_path / "runtime"  # a copy: a non-editable install writes build/ beside the sources
    shutil.copytree(REPO / "runtime", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                          str(REPO / "constraints.txt"), str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print([m for m in ('torch', 'edgeqa', 'transformers') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]", "the runtime venv holds no torch, transformers or edgeqa"
    imgs, _ = _image_folder(tmp_path, tiny_manifest)
    (imgs / "broken.png").unlink()
    r = subprocess.run([str(venv / "bin" / "edgeqa-edge"), "predict", "--bundle", str(tiny_bundle["dir"]),
                        str(imgs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(recs) == 3 and all(x["verdict"] in ("good", "defective") for x in recs)
