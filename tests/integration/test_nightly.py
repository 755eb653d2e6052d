"""The `edgeqa-pipeline/nightly` deployment through the session's real worker, and the one-run-at-a-time limit.

The nightly test is the case a scheduled run meets most nights: the project's committed state is the tiny run
whose outputs and run cache are on the S3 remote. The run clones it into a checkout of its own, pulls the run
cache, runs every stage through DVC (none retrains), saves the result, and releases it through the gate (the
tiny models are refused: nothing is published, nobody is asked to approve)."""

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from edgeqa.release.registry import Registry

from ..conftest import copy_repo, dvc
from .test_release import _artifacts, _git

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _set(repo, section, **values):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    cur = params
    for part in section.split("."):
        cur = cur[part]
    cur.update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_second_pipeline_run_waits_for_the_slot_then_fails_naming_the_limit_and_both_runs_notify(
        tmp_path, stack, cli, webhook):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    url, got = webhook
    repo = copy_repo(tmp_path / "repo")
    stack.configure_dvc(repo)
    _set(repo, "ops", lock_wait_s=3)
    out = cli(repo, "notify", "set-webhook", url)
    assert "custom-webhook/edgeqa-notify" in out and url not in out
    try:
        cli(repo, "notify", "test")
        assert got[-1] == {"subject": "edgeqa: test", "body": "edgeqa: a test message"}
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name("edgeqa-pipeline", 1)
        with concurrency("edgeqa-pipeline", occupy=1, strict=True):  # another run holds the slot
            out = cli(repo, "run", "--target", "synth", "--no-release", "--no-push", code=1)
        flat = " ".join(out.split())
        assert "holds the Prefect concurrency limit 'edgeqa-pipeline'" in flat and "ops.lock_wait_s" in flat, out
        assert not (repo / "data" / "synth").exists(), "no stage ran while the other run held the slot"
        out = cli(repo, "run", "--target", "synth", "--no-release", "--no-push")  # the slot is free again
        assert "pipeline completed" in out and (repo / "data" / "synth").is_dir()
        # the failure hook and the completion hook, each through the block
        subjects = [g["subject"] for g in got[1:]]
        assert len(subjects) == 2 and "Failed" in subjects[0] and "Completed" in subjects[1], subjects
        assert all(s.startswith("edgeqa: edgeqa-pipeline tiny-data-") for s in subjects)
        assert "edgeqa-pipeline" in got[1]["body"] and "/runs/flow-run/" in got[1]["body"]
        assert "stages that ran their command: synth" in got[2]["body"]
    finally:
        CustomWebhookNotificationBlock.delete("edgeqa-notify")  # later tests' runs notify nobody


def test_the_nightly_deployment_runs_in_its_own_checkout_and_a_night_with_nothing_new_retrains_nothing(
        tiny_repo, stack, cli, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    dvc(tiny_repo, "push", "--run-cache")  # what the tiny run's own `edgeqa run` would have pushed
    project = tmp_path / "project"  # the user's clone: the tiny run's params and dvc.lock committed, no outputs
    subprocess.run(["git", "clone", "-q", str(tiny_repo), str(project)], check=True)
    for f in ("params.yaml", "dvc.lock"):
        shutil.copy(tiny_repo / f, project / f)
    _set(project, "ops.nightly", cron="15 3 * * 1-5", timezone="Europe/Berlin")
    _git(project, "add", "params.yaml", "dvc.lock")
    _git(project, "commit", "-qm", "the tiny run, nightly at 03:15 Berlin time on weekdays")
    head = _git(project, "rev-parse", "HEAD")

    out = cli(project, "up")
    assert "edgeqa-pipeline/nightly: cron '15 3 * * 1-5' (Europe/Berlin), active" in " ".join(out.split())
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("edgeqa-pipeline/nightly")
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in dep.schedules] == \
        [("15 3 * * 1-5", "Europe/Berlin", True)]
    assert dep.parameters["ref"] == "HEAD" and dep.parameters["release"] is True

    reg = Registry(stack.s3_client(), os.environ["EDGEQA_RELEASES_BUCKET"])
    env = {"EDGEQA_RELEASES_BUCKET": os.environ["EDGEQA_RELEASES_BUCKET"]}
    fr = run_deployment("edgeqa-pipeline/nightly", timeout=900, job_variables={"env": env})
    assert fr.state.is_completed(), f"{fr.state.name}: {fr.state.message}"
    res = fr.state.result()

    # its own checkout, under the stack's state folder; the user's clone is as it was
    work = stack.cfg.path("checkouts", head[:12])
    assert res["repo"] == str(work) and (work / "models" / "edge").is_dir()
    assert _git(project, "status", "--porcelain") == "" and not (project / "models" / "edge").exists()
    # nothing new: every stage unchanged or restored from the pulled run cache, none ran its command
    assert res["ran"] == [] and len(res["stages"]) == len(yaml.safe_load((work / "dvc.lock").read_text())["stages"])
    assert dvc(work, "status", "--json").stdout.strip() == "{}"
    # the run's name: profile, data fingerprint, commit
    from edgeqa.runs import data_fingerprint

    assert fr.name == f"params-data-{data_fingerprint(work)}-{head[:7]}"
    assert re.fullmatch(r"params-data-[0-9a-f]{8}-[0-9a-f]{7}", fr.name)
    # recorded: the run is HEAD itself (nothing changed), published with the stage table and the links
    assert res["experiment"] == {"name": "HEAD", "commit": head}
    arts = {a.key: a for a in _artifacts(fr.id)}
    assert {"pipeline-experiment", "pipeline-stage-times", "gx-data-docs", "dvc-remote"} <= set(arts)
    assert head in arts["pipeline-experiment"].data
    assert all(row["ran"] is False for row in json.loads(arts["pipeline-stage-times"].data))
    assert arts["dvc-remote"].data.startswith("[DVC remote store](s3://")
    # then the release: the tiny models fail the policy, so nothing is published and nobody is asked
    gate = json.loads((work / "reports" / "gate" / "report.json").read_text())
    if not gate["passed"]:
        assert res["release"]["outcome"] == "refused" and reg.versions() == []
        assert reg.pointer("staging")[0] is None
