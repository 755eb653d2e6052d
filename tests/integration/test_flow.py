"""The `edgeqa-pipeline` flow, run once against the session's real Prefect server and read back via its API."""

import asyncio
import json

import pytest

from flows.pipeline import dag_stages

from ..conftest import STAGES

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_target_selects_a_stage_and_what_it_needs(flow_run):
    assert dag_stages(flow_run["repo"], "validate") == ["synth", "ingest", "validate"]
    assert dag_stages(flow_run["repo"], "convert") == ["convert"]
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        dag_stages(flow_run["repo"], "nope")


def test_stage_order_comes_from_dvc_yaml(flow_run):
    """Every stage once, each after the stages whose outputs it reads (DVC's own graph)."""
    import yaml

    order = dag_stages(flow_run["repo"])
    assert sorted(order) == sorted(STAGES)
    lock = yaml.safe_load((flow_run["repo"] / "dvc.lock").read_text())["stages"]
    produced = {o["path"]: name for name, st in lock.items() for o in st.get("outs", [])}
    for name, st in lock.items():
        for d in st.get("deps", []):
            src = next((s for path, s in produced.items() if d["path"] == path or d["path"].startswith(path + "/")
                        or path.startswith(d["path"] + "/")), None)
            if src is not None and src != name:
                assert order.index(src) < order.index(name), (src, name)


def test_flow_run_task_runs_and_artifacts_via_the_api(flow_run, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    assert flow_run["state"].is_completed(), flow_run["state"].message

    async def read():
        async with get_client() as c:
            fr = await c.read_flow_run(flow_run["id"])
            trs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run["id"]])))
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[flow_run["id"]])))
            return fr, trs, arts

    fr, trs, arts = asyncio.run(read())
    from edgeqa.runs import data_fingerprint, short_head

    repo = flow_run["repo"]  # named profile-data-commit: the tiny profile its params hold, the manifest's hash
    assert fr.state.is_completed() and fr.name == f"tiny-data-{data_fingerprint(repo)}-{short_head(repo)}"
    names = sorted(t.name for t in trs)
    assert [n for n in names if not n.startswith(("dvc-push", "links"))] == sorted(STAGES)
    assert any(n.startswith("dvc-push") for n in names) and any(n.startswith("links") for n in names)
    assert all(t.state.is_completed() for t in trs)
    keys = {a.key for a in arts}
    assert {"pipeline-stage-times", "gx-data-docs", "dvc-remote"} <= keys
    times = json.loads(next(a for a in arts if a.key == "pipeline-stage-times").data)
    assert {r["stage"] for r in times} == set(STAGES) and all(r["ran"] is True for r in times), \
        "a first run on a fresh copy runs every stage's command"
    for stage in STAGES:
        key = stage.replace("_", "-").replace("@", "-")  # artifact keys: lowercase letters, digits and dashes
        assert f"{key}-report" in keys and f"{key}-metrics" in keys
    report = next(a for a in arts if a.key == "validate-report")
    assert "PASSED" in report.data


def test_secret_appears_in_no_artifact_and_no_flow_log(flow_run, stack, prefect_api):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as c:
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
                any_=[flow_run["id"]])))
            logs: list = []
            while True:  # the API pages its answers (200 entries by default): read them all
                page = await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run["id"]])),
                                         limit=200, offset=len(logs))
                logs += page
                if len(page) < 200:
                    return arts, logs

    arts, logs = asyncio.run(read())
    assert arts and logs
    secret = stack.credentials().secret_key
    for a in arts:
        assert secret not in json.dumps(a.data, default=str), a.key
    for entry in logs:
        assert secret not in entry.message
    messages = "\n".join(e.message for e in logs)
    for stage in STAGES:
        assert f"{stage} | Running stage '{stage}'" in messages, "each stage's output is streamed to Prefect"
    assert "validate | " in messages and "expectations passed" in messages


def test_results_and_outputs_land_in_s3(flow_run, stack):
    s3 = stack.s3_client()
    results = s3.list_objects_v2(Bucket=stack.cfg.buckets["results"]).get("KeyCount", 0)
    assert results > 0, "flow results are persisted to the results bucket"
    dvc_objs = s3.list_objects_v2(Bucket=stack.cfg.buckets["dvc"]).get("KeyCount", 0)
    assert dvc_objs > 0, "dvc push sent the stage outputs to the S3 remote"


def test_flow_writes_per_stage_wall_times(flow_run):
    recs = json.loads((flow_run["repo"] / "reports" / "bench" / "pipeline.json").read_text())["records"]
    names = {r["name"] for r in recs}
    assert {f"stage:{s}" for s in STAGES} | {"pipeline:flow_wall"} <= names
    for r in recs:
        assert set(r) == {"name", "value", "unit", "target", "command", "machine", "date"}
        assert r["value"] > 0
