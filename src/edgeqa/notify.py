"""Flow-run state hooks for flows/ (Prefect is imported inside them): a notification when a pipeline or
release run completes, fails or crashes.

The message goes through the Prefect notification block `ops.notify_block` (`<type slug>/<name>`, default
`custom-webhook/edgeqa-notify`; `edgeqa notify set-webhook URL` saves one, and any notification block type
saved under that reference works: Slack, Microsoft Teams, ...). No block saved: no notification. The URL is
the block's secret; it is never a parameter, a params value or a log line. A notification that cannot be sent
is logged and never changes the run's state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

DEFAULT_BLOCK = "custom-webhook/edgeqa-notify"
log = logging.getLogger("edgeqa.notify")


def _block_ref(parameters: dict[str, Any]) -> str:
    from edgeqa.config import ParamsError, load_params

    try:
        return load_params(Path(parameters.get("repo", ".")) / "params.yaml").ops.notify_block
    except (ParamsError, OSError):
        return DEFAULT_BLOCK


def message(flow_name: str, run_name: str, run_id: Any, state: Any, result: dict[str, Any] | None) -> tuple[str, str]:
    """(subject, body) of a run's notification."""
    ui = os.environ.get("PREFECT_UI_URL") or os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
    outcome = f" ({result['outcome']})" if result and "outcome" in result else ""
    subject = f"edgeqa: {flow_name} {run_name} {state.name}{outcome}"
    lines = [subject, f"state: {state.name}: {state.message or ''}".rstrip(": ")]
    if result and result.get("summary"):
        lines.append(f"summary: {result['summary']}")
    if result and "ran" in result:
        lines.append(f"stages that ran their command: {', '.join(result['ran']) or 'none'}")
    lines.append(f"run: {ui}/runs/flow-run/{run_id}")
    return subject, "\n".join(lines)


def notify(flow: Any, flow_run: Any, state: Any) -> None:
    """The hook (on_completion, on_failure, on_crashed)."""
    result = None
    if state.is_completed():
        try:
            res = state.result()
            result = res if isinstance(res, dict) else None
        except Exception:  # noqa: BLE001 - a result that cannot be read only shortens the message
            result = None
    subject, body = message(flow.name, flow_run.name, flow_run.id, state, result)
    send(_block_ref(flow_run.parameters or {}), subject, body)


def send(ref: str, subject: str, body: str) -> bool:
    """Send one message through the notification block `ref` (e.g. a drift alert); False when none is saved
    or it could not be sent (logged by exception type, never the URL)."""
    from prefect.blocks.core import Block

    try:
        block: Any = Block.load(ref)
    except (ValueError, KeyError):
        log.info("no notification block %s: not notifying (%s)", ref, subject)
        return False
    try:
        block.notify(body=body, subject=subject)
    except Exception as exc:  # noqa: BLE001 - a failed notification never changes the run
        log.warning("notification through %s failed: %s", ref, type(exc).__name__)
        return False
    return True
