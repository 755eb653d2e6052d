"""End to end: `dvc repro` of the stages on the tiny profile, and profiles seen through `dvc status`."""

import json
import shutil

import pandas as pd
import pytest
import yaml

from edgeqa.config import profiles

from ..conftest import STAGES, copy_repo, dvc, mtile_root

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_dvc_repro_runs_the_stages(tiny_repo):
    df = pd.read_parquet(tiny_repo / "data" / "ingest" / "manifest.parquet")
    assert len(df) == 2 * 20 + 6 * 10 and set(df.split) == {"labelled", "unlabelled", "val", "test"}
    assert json.loads((tiny_repo / "reports" / "validate" / "metrics.json").read_text())["success"] is True
    assert (tiny_repo / "reports" / "validate" / "datadocs" / "index.html").exists()
    lock = yaml.safe_load((tiny_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    labels = (tiny_repo / "data" / "labels" / "labels.jsonl").read_text().splitlines()
    assert len(labels) == int(df.split.isin(["labelled", "unlabelled"]).sum())
    assert (tiny_repo / "models" / "base_lm" / "model.safetensors").exists()
    assert lock["stages"]["synth"]["params"]["params.yaml"]["synth"]["good_per_category"] == 20
    for model in yaml.safe_load((tiny_repo / "params.yaml").read_text())["evaluate"]["models"][1:]:
        if model == "edge":  # the bundle quantize wrote, verified file by file as the runtime does
            from edgeqa_runtime.bundle import verify

            assert verify(tiny_repo / "models" / "edge")["source"] in ("baseline", "sft", "distill")
        else:
            cfg = json.loads((tiny_repo / "models" / model / "config.json").read_text())
            assert cfg["model_type"] == "edgeqa_student"
            if model == "pruned":  # names the student it came from, the one the bundle names too
                assert cfg["lineage"]["source"] == verify_source(tiny_repo)
        m = json.loads((tiny_repo / "reports" / "evaluate" / model / "metrics.json").read_text())
        assert m["parse_rate"] == 1.0
    table = (tiny_repo / "reports" / "retention" / "report.md").read_text()
    assert all(f"| {row} |" in table for row in ("teacher", "baseline", "sft", "distill", "pruned", "edge"))
    gate = json.loads((tiny_repo / "reports" / "gate" / "report.json").read_text())
    assert gate["candidate"] == "edge" and gate["passed"] == (gate["failed"] == [])
    assert not {"bundle_intact", "scored_this_bundle", "same_images"} & set(gate["failed"]), \
        "the pipeline gates the bundle it built, scored on the teacher's and baseline's images"
    assert (tiny_repo / "reports" / "gate" / "report.md").read_text().startswith(
        "# gate: PASSED" if gate["passed"] else "# gate: REFUSED")
    assert dvc(tiny_repo, "status", "--json").stdout.strip() == "{}"
    r = dvc(tiny_repo, "repro")
    assert "didn't change, skipping" in r.stdout or "up to date" in r.stdout


def verify_source(repo) -> str:
    from edgeqa_runtime.bundle import verify

    return verify(repo / "models" / "edge")["source"]


def _params_of_stage(repo) -> dict[str, list[str]]:
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    models = yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["models"]
    out = {}
    for name, s in stages.items():
        keys = [p for p in s.get("do", s).get("params", []) if isinstance(p, str)]
        if "foreach" in s:  # only the evaluate stage loops, over evaluate.models
            assert s["foreach"] == "${evaluate.models}"
            out.update({f"{name}@{m}": keys for m in models})
        else:
            out[name] = keys
    return out


@pytest.mark.parametrize("profile", ["mtile", "full"])
def test_applying_a_profile_makes_dvc_status_list_exactly_the_stages_whose_params_changed(tmp_path, tiny_repo,
                                                                                            profile):
    if profile == "mtile" and not mtile_root().is_dir():  # its ingest dep is the dataset folder itself
        pytest.skip(f"the magnetic-tile dataset is not at {mtile_root()} (EDGEQA_MTILE_ROOT)")
    repo = tmp_path / "r"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    # the copy sees the dataset where the profile resolves it (../shared/... unless EDGEQA_MTILE_ROOT says so)
    (tmp_path / "shared" / "datasets").mkdir(parents=True)
    (tmp_path / "shared" / "datasets" / "magnetic-tile").symlink_to(mtile_root())
    changed = profiles.apply(profile, repo / "params.yaml", repo)
    expected = {stage for stage, keys in _params_of_stage(repo).items()
                if any(k == key or k.startswith(key + ".") for k in changed for key in keys)}
    assert expected, "the profile changes some stage's params"
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    assert set(status) == expected, (status, changed)
    for stage in expected:
        listed = {k for e in status[stage] if isinstance(e, dict)
                  for k in e.get("changed deps", {}).get("params.yaml", {})}
        assert listed, status[stage]
        assert all(any(k == c or k.startswith(c + ".") or c.startswith(k + ".") for c in changed) for k in listed), \
            (listed, changed)


def test_bad_params_value_stops_dvc_repro_with_the_key_named(tmp_path, stack):
    repo = copy_repo(tmp_path / "r")
    p = repo / "params.yaml"
    p.write_text(p.read_text().replace("min_side: 32", "min_side: 99999"))
    r = dvc(repo, "repro", "ingest", check=False)
    assert r.returncode != 0
    assert "ingest: min_side (99999) must be <= max_side" in (r.stdout + r.stderr)
    assert not (repo / "data" / "ingest").exists()


def test_dvc_exp_run_sweeps_the_distillation_temperature(tmp_path, tiny_repo):
    repo = tmp_path / "r"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    r = dvc(repo, "exp", "run", "-S", "distill.temperature=3.5")
    assert "Running stage 'distill'" in r.stdout and "Running stage 'sft'" not in r.stdout, r.stdout
    assert json.loads((repo / "reports" / "distill" / "metrics.json").read_text())["temperature"] == 3.5
    shown = dvc(repo, "exp", "show", "--json").stdout
    assert "3.5" in shown


def test_each_stage_reads_only_the_params_its_dvc_yaml_entry_declares(tiny_repo):
    """Every stage process of the tiny `dvc repro` recorded the params fields it read (EDGEQA_TRACE_PARAMS);
    each read is covered by the stage's `params:` in dvc.yaml, so DVC reruns a stage exactly when what it reads
    changes."""
    from edgeqa.config.trace import covered, leaf_keys

    declared = _params_of_stage(tiny_repo)
    traces = [json.loads(f.read_text()) for f in (tiny_repo.parent / "params-trace").glob("*.json")]
    seen = {t["stage"] for t in traces}
    assert seen == set(STAGES), f"a trace from every stage: missing {set(STAGES) - seen}"
    problems = {}
    for t in traces:
        keys = leaf_keys(t["keys"])
        assert keys, f"{t['stage']} read no params at all"
        bad = sorted(k for k in keys if not covered(k, declared[t["stage"]]))
        if bad:
            problems[t["stage"]] = bad
    assert not problems, f"stages read params their dvc.yaml entry does not declare: {problems}"


def test_the_seeds_experiment_reproduces_the_pipelines_seed_and_reports_every_row(tmp_path, tiny_repo):
    """`edgeqa seeds` retrains baseline/sft/distill per seed on the pipeline's own outputs: its seed 0 (the
    params' student.seed) answers exactly like the pipeline's own stages, a second call reuses every result,
    and nothing the pipeline wrote changes (dvc status stays clean)."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "r"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    assert yaml.safe_load((repo / "params.yaml").read_text())["student"]["seed"] == 0
    cmd = [str(shutil.which("edgeqa") or os.path.join(os.path.dirname(sys.executable), "edgeqa")), "--project",
           str(repo), "seeds", "--seed", "0", "--seed", "1", "--bootstrap", "200"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((repo / "reports" / "seeds" / "report.json").read_text())
    assert rep["seeds"] == [0, 1] and set(rep["per_seed"]) == {"baseline", "sft", "distill"}
    for row in ("baseline", "sft", "distill"):
        ours = [json.loads(x) for x in (repo / "reports" / "seeds" / "runs" / "seed-0" / row
                                        / "predictions.jsonl").read_text().splitlines()]
        pipeline = [json.loads(x) for x in (repo / "reports" / "evaluate" / row
                                            / "predictions.jsonl").read_text().splitlines()]
        assert [o["sha256"] for o in ours] == [p["sha256"] for p in pipeline]
        assert [o["verdict"] for o in ours] == [p["verdict"] for p in pipeline], row
        assert max(abs(o["p_defective"] - p["p_defective"]) for o, p in zip(ours, pipeline)) < 1e-5, row
        assert len(rep["per_seed"][row]) == 2 and rep["summary"][row]["auroc"]["sd"] is not None
    for row in ("sft", "distill"):
        b = rep["versus_baseline"][row]["auroc"]
        assert b["ci_low"] <= b["delta"] <= b["ci_high"] and b["resamples"] > 0
    md = (repo / "reports" / "seeds" / "report.md").read_text()
    assert "The seed's claim" in md and "| distill | auroc |" in md
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "training" not in again.stderr, again.stderr
    assert json.loads((repo / "reports" / "seeds" / "report.json").read_text()) == rep
    assert dvc(repo, "status", "--json").stdout.strip() == "{}"
