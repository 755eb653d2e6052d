"""The approval form in the Prefect UI, in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright opens the suspended `edgeqa-release` run on the session's Prefect server, presses Resume, fills
the typed form (decision, reviewer, the one-time token, a comment) and submits; the run resumes on the worker
and moves production. Where /usr/bin/chromium is missing the test is skipped, unless EDGEQA_REQUIRE_BROWSER=1
(`.ci/run` installs Chromium and sets it), so CI never skips it silently."""

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from edgeqa.release.registry import Registry

from .test_release import REVIEWER, _git, make_releasable

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.browser]
if not CHROMIUM.exists() and os.environ.get("EDGEQA_REQUIRE_BROWSER") != "1":
    pytestmark.append(pytest.mark.skip(reason="no /usr/bin/chromium (apt-get install chromium); .ci/run installs it"))
# what Chromium needs on a machine with no network (see the guide): no background connections, a fresh profile
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@contextmanager
def open_browser() -> Iterator[Any]:
    """A page in headless Chromium with a new, empty profile (1400x1000)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(tempfile.mkdtemp(), executable_path=str(CHROMIUM), headless=True,
                                                   args=ARGS, viewport={"width": 1400, "height": 1000})
        try:
            yield ctx.new_page()
        finally:
            ctx.close()


def _fill_form(url: str, reviewer: str, token: str, comment: str, shot: Path) -> None:
    with open_browser() as page:
        page.goto(url)
        page.get_by_role("button", name="Resume").click()
        dlg = page.get_by_role("dialog")

        def field(label: str):
            return dlg.locator(".schema-form-property").filter(
                has=page.locator(".schema-form-property__label", has_text=label))

        field("Decision").locator("button.p-select-button__control").click()
        page.keyboard.press("ArrowDown")  # the select opens its options on a key press
        page.get_by_role("option", name="approve", exact=True).click()
        field("Reviewer").locator("textarea").fill(reviewer)
        field("Token").locator("textarea").fill(token)
        field("Comment").locator("textarea").fill(comment)
        page.screenshot(path=str(shot))
        dlg.get_by_role("button", name="Submit").click()
        page.get_by_role("dialog").wait_for(state="detached", timeout=15000)


def test_a_reviewer_approves_in_the_prefect_ui_form(tiny_repo, stack, cli, tmp_path):
    from prefect.client.orchestration import get_client

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    reg = Registry(stack.s3_client(), os.environ["EDGEQA_RELEASES_BUCKET"])
    make_releasable(repo)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "the run to release")
    out = cli(repo, "release", "--reason", "replaced before anyone decides")
    first = reg.pointer("staging")[0]
    _git(repo, "commit", "-q", "--allow-empty", "-m", "a later commit of the same run")
    out = cli(repo, "release", "--reason", "for the form")
    version = out.split("staged: ")[1].split()[0]
    staging, _ = reg.pointer("staging")
    run_id = staging["flow_run_id"]
    assert version != first["to"] and run_id != first["flow_run_id"]
    with get_client(sync_client=True) as client:  # the request it replaced is closed: its run is cancelled
        old = client.read_flow_run(first["flow_run_id"])
    assert old.state.is_cancelled() and f"{version} replaced {first['to']}" in old.state.message

    rkey = tmp_path / "alice.pem"
    rkey.write_bytes(REVIEWER.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    rkey.chmod(0o600)
    t = cli(repo, "approval-token", version, "--key", str(rkey))
    token = next(line.split("token: ")[1] for line in t.splitlines() if line.startswith("token: "))
    url = f"{stack.cfg.prefect_ui_url}/runs/flow-run/{run_id}"
    assert url in t, "the token's message links the run's page"

    _fill_form(url, "qe.alice", token, "approved in the browser", tmp_path / "form.png")
    with get_client(sync_client=True) as client:
        for _ in range(180):
            fr = client.read_flow_run(run_id)
            if fr.state.is_final():
                break
            time.sleep(1)
    assert fr.state.is_completed(), fr.state
    res = fr.state.result()
    assert res["outcome"] == "released", res["summary"]
    ev = reg.audit("production")[-1]
    assert ev["to"] == version and ev["action"] == "approve" and ev["reason"] == "approved in the browser"
    assert ev["approval"]["decision"]["via"] == "prefect-ui-token"
    assert token not in json.dumps(ev), "the token itself is kept nowhere"
