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


SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu() -> str:
    """The CPU model and the instruction-set flags that decide speed here (int8 dot products, bf16, AMX)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{name}; flags: {' '.join(f for f in SPEED_FLAGS if f in flags) or 'none of ' + '/'.join(SPEED_FLAGS)}"


def machine() -> str:
    return (f"{platform.system()} {platform.machine()} {os.cpu_count()} cpus ({cpu()}), "
            f"python {platform.python_version()}")


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
