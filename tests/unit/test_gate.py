"""The release gate (edgeqa.release.gate, stage `gate`): each rule at its boundary, overrides recorded as such,
a tampered or stale candidate refused, bad policy named by key. The bundle is a real edge-runtime manifest."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from edgeqa.config import ParamsError, load_params, parse_params, profiles
from edgeqa.errors import StageError
from edgeqa.release import gate
from edgeqa_runtime.bundle import write_manifest
from edgeqa_runtime.files import folder_fingerprint

from ..conftest import REPO


def _raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _cfg(**gate_changes):
    raw = _raw()
    for key, value in gate_changes.items():
        section, name = key.split("__")
        raw["gate"][section][name] = value
    return parse_params(raw).gate


def _eval(**kw):
    m = {"split": "test", "images": 100, "defective": 40, "auroc": 0.96, "type_accuracy": 0.8, "parse_rate": 1.0,
         "miss_rate": 0.05, "overkill_rate": 0.05}
    m.update(kw)
    return m


@pytest.fixture
def project(tmp_path):
    """reports/evaluate/{edge,teacher,baseline}/metrics.json and a real (tiny) bundle with its manifest."""
    bundle = tmp_path / "models" / "edge"
    bundle.mkdir(parents=True)
    (bundle / "vision.onnx").write_bytes(b"\0" * 2_000_000)
    (bundle / "runtime.json").write_text("{}")
    write_manifest(bundle, source="distill", version="distill-abc", threshold={"threshold": 0.4})
    fp = folder_fingerprint(bundle)
    evals = tmp_path / "reports" / "evaluate"
    for name, kw in (("edge", {"fingerprint": fp}), ("teacher", {"auroc": 0.975, "type_accuracy": 0.9}),
                     ("baseline", {"auroc": 0.955, "type_accuracy": 0.45})):
        (evals / name).mkdir(parents=True)
        (evals / name / "metrics.json").write_text(json.dumps(_eval(**kw)))
    return tmp_path


def _run(cfg, root):
    out = root / "reports" / "gate"
    return gate.run(cfg, root / "reports" / "evaluate", root / "models" / "edge", out / "metrics.json",
                    out / "report.md", out / "report.json")


def _set(root, name, **kw):
    f = root / "reports" / "evaluate" / name / "metrics.json"
    m = json.loads(f.read_text())
    m.update(kw)
    f.write_text(json.dumps(m))


def test_a_candidate_that_meets_every_rule_passes_and_the_report_lists_each_rule(project):
    res = _run(_cfg(), project)
    assert res["passed"] and res["failed"] == [] and res["summary"].startswith("passed")
    names = [r["rule"] for r in res["rules"]]
    assert names[:len(gate.RULES)] == [r.name for r in gate.RULES]
    assert {"bundle_intact", "scored_this_bundle", "same_images"} <= set(names)
    by = {r["rule"]: r for r in res["rules"]}
    assert by["max_bundle_mb"]["value"] == pytest.approx(sum(
        p.stat().st_size for p in (project / "models" / "edge").iterdir()) / 1e6)
    assert by["max_auroc_drop_vs_teacher"]["value"] == pytest.approx(0.015)
    assert by["max_auroc_drop_vs_baseline"]["value"] == pytest.approx(-0.005)
    out = project / "reports" / "gate"
    assert json.loads((out / "report.json").read_text())["passed"] is True
    assert json.loads((out / "metrics.json").read_text())["values"]["min_auroc"] == pytest.approx(0.96)
    md = (out / "report.md").read_text()
    assert md.startswith("# gate: PASSED") and "| min_type_accuracy |" in md


# the candidate (edge) has AUROC 0.96 and type accuracy 0.8; each case moves one figure just inside the
# policy's threshold, then just beyond it (1e-4 either side; the other rules keep passing)
@pytest.mark.parametrize(("rule", "role", "key", "inside", "beyond"), [
    ("min_auroc", "edge", "auroc", 0.9501, 0.9499),
    ("min_type_accuracy", "edge", "type_accuracy", 0.5001, 0.4999),
    ("min_parse_rate", "edge", "parse_rate", 0.9901, 0.9899),
    ("max_miss_rate", "edge", "miss_rate", 0.0999, 0.1001),
    ("max_overkill_rate", "edge", "overkill_rate", 0.0999, 0.1001),
    ("max_auroc_drop_vs_teacher", "teacher", "auroc", 0.96 + 0.0299, 0.96 + 0.0301),
    ("max_auroc_drop_vs_baseline", "baseline", "auroc", 0.96 + 0.0099, 0.96 + 0.0101),
    ("max_type_accuracy_drop_vs_baseline", "baseline", "type_accuracy", 0.8 + 0.0499, 0.8 + 0.0501),
])
def test_each_rule_holds_inside_its_threshold_and_refuses_beyond_it(project, rule, role, key, inside, beyond):
    cfg = _cfg()
    assert getattr(cfg.rules, rule) is not None
    _set(project, role, **{key: inside})
    by = {r["rule"]: r for r in _run(cfg, project)["rules"]}
    assert by[rule]["passed"], by[rule]
    _set(project, role, **{key: beyond})
    res = _run(cfg, project)
    assert not res["passed"] and res["failed"] == [rule]
    assert res["summary"].startswith(f"refused: {rule} (") and "allowed" in res["summary"]
    assert (project / "reports" / "gate" / "report.md").read_text().startswith("# gate: REFUSED")


def test_bundle_size_rule(project):
    assert not _run(_cfg(rules__max_bundle_mb=1.5), project)["passed"]  # the bundle holds 2 MB of graph
    assert _run(_cfg(rules__max_bundle_mb=3.0), project)["passed"]


def test_a_missing_metric_fails_its_rule_and_says_so(project):
    _set(project, "edge", type_accuracy=None)
    res = _run(_cfg(), project)
    row = {r["rule"]: r for r in res["rules"]}["min_type_accuracy"]
    assert not row["passed"] and row["why"] == "no value in the evaluate metrics"
    assert "no value" in res["summary"]


def test_an_override_relaxes_one_rule_and_is_recorded_as_such(project):
    _set(project, "edge", type_accuracy=0.42)
    assert _run(_cfg(), project)["failed"] == ["min_type_accuracy"]
    raw = _raw()
    raw["gate"]["overrides"]["min_type_accuracy"] = 0.4
    raw["gate"]["override_reason"] = "pilot line: the type field is advisory"
    res = _run(parse_params(raw).gate, project)
    assert res["passed"] and "1 by an explicit override" in res["summary"]
    row = {r["rule"]: r for r in res["rules"]}["min_type_accuracy"]
    assert row["source"] == "override" and row["threshold"] == 0.4 and row["policy"] == 0.5
    assert res["overrides"] == {"min_type_accuracy": {"value": 0.4, "policy": 0.5}}
    md = (project / "reports" / "gate" / "report.md").read_text()
    assert "pilot line: the type field is advisory" in md and "instead of the policy's 0.5" in md


def test_an_override_without_a_reason_is_refused_by_name():
    raw = _raw()
    raw["gate"]["overrides"]["max_miss_rate"] = 0.3
    with pytest.raises(ParamsError, match=r"gate: .*\['max_miss_rate'\].*gate\.override_reason must say why"):
        parse_params(raw)


def test_a_profile_may_not_change_the_policy_itself(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "lax.yaml").write_text("gate.rules.min_auroc: 0.5\n")
    with pytest.raises(ParamsError, match=r"gate\.rules\.min_auroc: .*gate\.overrides\.min_auroc and "
                                          r"gate\.override_reason"):
        profiles.load_profile("lax", tmp_path)


@pytest.mark.parametrize("name", ["tiny", "mtile", "full"])
def test_every_profile_keeps_the_same_policy(tmp_path, name):
    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    profiles.apply(name, p, REPO)
    assert load_params(p).gate.rules == load_params(REPO / "params.yaml").gate.rules


def test_the_candidate_must_be_an_evaluated_model():
    raw = _raw()
    raw["gate"]["candidate"] = "pruned_int4"
    with pytest.raises(ParamsError, match=r"gate\.candidate \('pruned_int4'\).*must be in evaluate\.models"):
        parse_params(raw)


def test_a_tampered_bundle_is_refused_but_the_stage_still_reports(project):
    f = project / "models" / "edge" / "runtime.json"
    f.write_text('{"threshold": 0.0}')
    _set(project, "edge", fingerprint=folder_fingerprint(project / "models" / "edge"))
    res = _run(_cfg(), project)
    assert res["failed"] == ["bundle_intact"]
    assert "runtime.json does not match its SHA-256" in res["summary"]


def test_scores_of_another_bundle_are_refused_as_stale(project):
    _set(project, "edge", fingerprint="0123456789abcdef")
    res = _run(_cfg(), project)
    assert res["failed"] == ["scored_this_bundle"] and "stale" in res["summary"]


def test_evaluations_on_different_images_are_refused(project):
    _set(project, "teacher", images=99)
    assert _run(_cfg(), project)["failed"] == ["same_images"]


def test_a_bundle_from_the_baseline_is_reported_as_carrying_no_teacher_knowledge(project):
    bundle = project / "models" / "edge"
    write_manifest(bundle, source="baseline", version="baseline-abc", threshold={"threshold": 0.4})
    _set(project, "edge", fingerprint=folder_fingerprint(bundle))
    res = _run(_cfg(), project)
    assert res["passed"] and res["teacher_knowledge_in_bundle"] is False
    assert "carries none of the teacher's knowledge" in (project / "reports" / "gate" / "report.md").read_text()


def test_the_stage_exits_0_on_a_refusal_and_2_on_a_folder_that_is_no_bundle(project):
    _set(project, "edge", auroc=0.5)
    out = project / "reports" / "gate"
    cmd = [sys.executable, "-m", "tasks.gate", "--params", str(REPO / "params.yaml"),
           "--evaluations", str(project / "reports" / "evaluate"), "--bundle", str(project / "models" / "edge"),
           "--metrics", str(out / "metrics.json"), "--report", str(out / "report.md"),
           "--report-json", str(out / "report.json")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "report.json").read_text())["failed"][0] == "min_auroc"
    (project / "models" / "edge" / "manifest.json").unlink()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "manifest.json is missing" in r.stderr and "edge bundle" in r.stderr
    with pytest.raises(StageError, match="not a PyTorch model folder"):
        gate.bundle_facts(project / "models" / "edge")
