"""One JSON record format for every benchmark file under reports/bench/ (later issues reuse it)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any

from edgeqa.io import write_json

FIELDS = ("name", "value", "unit", "target", "command", "machine", "date")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus ({cpu}), python {platform.python_version()}"


def record(name: str, value: float | None, unit: str, target: str | None, command: str) -> dict[str, Any]:
    return {"name": name, "value": None if value is None else round(float(value), 4), "unit": unit,
            "target": target, "command": command, "machine": machine(),
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def write(path: Path, records: list[dict[str, Any]], merge: bool = True) -> None:
    """Write records; with merge, records of other names already in the file are kept."""
    old: list[dict[str, Any]] = []
    if merge and path.exists():
        old = json.loads(path.read_text()).get("records", [])
    names = {r["name"] for r in records}
    write_json(path, {"records": [r for r in old if r["name"] not in names] + records})
