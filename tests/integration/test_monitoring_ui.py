"""Monitoring in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) opens the
session's Prefect UI. There it finds:
- the pipeline's flow run by its name (profile, data fingerprint, commit);
- its stage task runs;
- its artifacts: the stage table, the Data Docs link and the gate's report;
- the nightly deployment with its schedule.

It saves a screenshot of each under reports/ui/, and fails if the page does not show what it looks for.
Skipped without /usr/bin/chromium unless EDGEQA_REQUIRE_BROWSER=1 (as test_approval_ui)."""

import re

import pytest

from ..conftest import REPO
from .test_approval_ui import open_browser
from .test_approval_ui import pytestmark as browser_marks
from .test_nightly import _set

pytestmark = list(browser_marks)  # integration, slow, browser; skipped without chromium
SHOTS = REPO / "reports" / "ui"


def test_the_prefect_ui_shows_the_pipeline_run_its_stages_and_artifacts_and_the_nightly_schedule(
        flow_run, stack, cli):
    from prefect.client.orchestration import get_client

    repo = flow_run["repo"]
    _set(repo, "ops.nightly", cron="15 3 29 2 *", timezone="Europe/Berlin")  # never fires during a test session
    cli(repo, "up")
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(flow_run["id"])
        dep = client.read_deployment_by_name("edgeqa-pipeline/nightly")
    assert re.fullmatch(r"tiny-data-[0-9a-f]{8}-[0-9a-f]{7}(\+dirty)?", fr.name)
    SHOTS.mkdir(parents=True, exist_ok=True)
    ui = stack.cfg.prefect_ui_url
    shots = []
    with open_browser() as page:
        page.goto(f"{ui}/runs/flow-run/{fr.id}")
        page.get_by_text(fr.name, exact=True).first.wait_for(timeout=30000)
        page.get_by_text("Completed", exact=True).first.wait_for(timeout=10000)
        shots.append(SHOTS / "pipeline-run.png")
        page.screenshot(path=str(shots[-1]))

        page.get_by_text("Task Runs", exact=True).click()
        for stage in ("teacher_sft", "evaluate@edge", "gate"):
            page.get_by_placeholder("Search by run name").fill(stage)
            page.get_by_role("link", name=stage, exact=True).wait_for(timeout=15000)
        shots.append(SHOTS / "pipeline-task-runs.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

        page.get_by_text("Artifacts", exact=True).click()
        for key in ("pipeline-stage-times", "gx-data-docs", "dvc-remote", "gate-report", "validate-report"):
            page.get_by_text(key, exact=True).first.wait_for(timeout=15000)
        shots.append(SHOTS / "pipeline-artifacts.png")
        page.screenshot(path=str(shots[-1]), full_page=True)

        page.goto(f"{ui}/deployments/deployment/{dep.id}")
        page.get_by_text("nightly", exact=True).first.wait_for(timeout=30000)
        page.get_by_text(re.compile(r"^At 03:15 AM on day 29 of the month, only in February")).first.wait_for(
            timeout=15000)
        shots.append(SHOTS / "nightly-deployment.png")
        page.screenshot(path=str(shots[-1]), full_page=True)
    for s in shots:
        assert s.stat().st_size > 20_000, f"{s}: an empty page?"
    pytest.importorskip("PIL")
    from PIL import Image

    for s in shots:
        with Image.open(s) as im:
            assert im.size[0] == 1400 and len(set(im.convert("L").getdata())) > 16, f"{s} shows a blank page"
