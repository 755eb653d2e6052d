"""Which params a process reads: a record for the test that each stage reads only what dvc.yaml declares.

Off unless the environment variable EDGEQA_TRACE_PARAMS names a folder. Then `load_params` marks every
section of the loaded params with its dotted path, each field read is recorded (`teacher.max_reason_tokens`;
a whole section serialised is recorded as `teacher.*`), and at exit the process writes
`<folder>/<pid>.json`: {"stage": $DVC_STAGE, "argv": [...], "keys": [...]}. Nothing else changes.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import Any

ENV = "EDGEQA_TRACE_PARAMS"
_paths: dict[int, str] = {}
_keys: set[str] = set()
_on = False


def active() -> bool:
    return _on


def start(params: Any) -> None:
    """Begin recording reads of `params` (a loaded Params) if EDGEQA_TRACE_PARAMS is set."""
    global _on
    folder = os.environ.get(ENV)
    if not folder:
        return
    was_on, _on = _on, False  # walking the tree must not record
    _mark(params, "")
    if not was_on:  # the first load in this process: write the record at exit
        atexit.register(_write, Path(folder))
    _on = True


def _mark(obj: Any, path: str) -> None:
    fields = getattr(type(obj), "model_fields", None)
    if fields is None:
        if isinstance(obj, (list, tuple)):
            for item in obj:
                _mark(item, path)
        return
    _paths[id(obj)] = path
    values = object.__getattribute__(obj, "__dict__")
    for name, field in fields.items():
        key = field.alias or name  # params.yaml's spelling (validate_ is `validate` there)
        _mark(values.get(name), f"{path}.{key}" if path else key)


def read(section: Any, name: str | None) -> None:
    path = _paths.get(id(section))
    if path is None:  # a copy made after loading (e.g. model_copy): not the stage's params
        return
    if name is None:
        _keys.add(f"{path}.*" if path else "*")
        return
    field = type(section).model_fields.get(name)
    key = (field.alias if field is not None else None) or name
    _keys.add(f"{path}.{key}" if path else key)


def _write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"stage": os.environ.get("DVC_STAGE"), "argv": sys.argv, "keys": sorted(_keys)}
    (folder / f"{os.getpid()}.json").write_text(json.dumps(rec) + "\n")


def leaf_keys(keys: set[str] | list[str]) -> set[str]:
    """The reads that matter: a key is dropped when a deeper key under it was read (reaching a field through
    its section is not reading the whole section)."""
    ks = set(keys)
    return {k for k in ks if not any(o != k and o.startswith(k + ".") for o in ks)}


def covered(key: str, declared: list[str]) -> bool:
    """Whether dvc.yaml's params entries `declared` cover the read `key` (`a.b`, or `a.b.*` for a whole
    section)."""
    k = key.removesuffix(".*")
    return any(k == d or k.startswith(d + ".") or (not key.endswith(".*") and d.startswith(k + "."))
               for d in declared)
