"""Profiles: files of dotted-key overrides, applied to params.yaml the way `dvc exp run -S key=value` does.

They are written into params.yaml (so dvc.lock and DVC experiments record what actually ran), never merged
at load time. A profile may not set `paths.*`, nor `gate.rules.*` (the release policy; a profile sets an
explicit, recorded exception with `gate.overrides.<rule>` and `gate.override_reason`). A value `dataset:NAME`
is a dataset location, resolved when the profile is applied (`edgeqa.config.datasets`: environment variable,
then the default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from edgeqa.config.datasets import resolve
from edgeqa.config.schema import ParamsError, load_params

PROFILE_DIR = "profiles"


def profile_path(name: str, root: Path = Path()) -> Path:
    return root / PROFILE_DIR / f"{name}.yaml"


def available(root: Path = Path()) -> list[str]:
    return sorted(p.stem for p in (root / PROFILE_DIR).glob("*.yaml"))


def load_profile(name: str, root: Path = Path()) -> dict[str, Any]:
    path = profile_path(name, root)
    if not path.is_file():
        raise ParamsError(f"unknown profile {name!r}; available: {available(root)}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: a profile is a mapping of dotted keys to values")
    for key in list(data):
        try:
            data[key] = resolve(data[key])
        except KeyError as exc:
            raise ParamsError(f"{path}: {key}: {exc.args[0]}") from None
        check_key(key, str(path))
    return data


def check_key(key: Any, where: str) -> None:
    """The keys a profile or a run's overrides may set: dotted params names, never paths.* or gate.rules.*."""
    if not isinstance(key, str) or "." not in key:
        raise ParamsError(f"{where}: {key!r}: keys are dotted params names like 'synth.seed'")
    if key.split(".")[0] == "paths":
        raise ParamsError(f"{where}: {key}: a profile may not set paths.*; paths belong to dvc.yaml/params.yaml")
    if key.startswith("gate.rules"):
        rule = key.split(".")[2] if key.count(".") >= 2 else "<rule>"
        raise ParamsError(f"{where}: {key}: the release policy is the same in every profile; set an explicit "
                          f"exception instead: gate.overrides.{rule} and gate.override_reason")


def to_override(key: str, value: Any) -> str:
    """One Hydra override string, as `dvc exp run -S` takes it."""
    if isinstance(value, dict):
        raise ParamsError(f"{key}: set mapping entries one by one with dotted keys (e.g. {key}.name: value)")
    return f"{key}={json.dumps(value)}"


def get_dotted(data: dict[str, Any], key: str) -> Any:
    cur: Any = data
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


def changed_keys(name: str, params_file: Path, root: Path = Path()) -> dict[str, tuple[Any, Any]]:
    """Keys the profile would change in params_file: {key: (current, new)}."""
    current = yaml.safe_load(params_file.read_text())
    out = {}
    for k, v in load_profile(name, root).items():
        try:
            cur = get_dotted(current, k)
        except KeyError:
            raise ParamsError(f"profile {name}: {k}: no such key in {params_file}") from None
        if cur != v:
            out[k] = (cur, v)
    return out


def apply(name: str, params_file: Path = Path("params.yaml"), root: Path = Path()) -> dict[str, tuple[Any, Any]]:
    """Write the profile into params_file with DVC's own override mechanism; validate the result.

    On a validation failure params_file is restored, so nothing is left half-applied.
    """
    return _write(changed_keys(name, params_file, root), params_file)


def set_keys(overrides: dict[str, Any], params_file: Path, where: str = "overrides") -> dict[str, tuple[Any, Any]]:
    """Write dotted-key values into params_file as `dvc exp run -S key=value` does (a run's parameters, e.g. a
    scheduled run's `overrides`), under the same rules as a profile; `where` names their origin in errors."""
    current = yaml.safe_load(params_file.read_text())
    changes = {}
    for k, v in overrides.items():
        check_key(k, where)
        try:
            cur = get_dotted(current, k)
        except KeyError:
            raise ParamsError(f"{where}: {k}: no such key in {params_file}") from None
        try:
            new = resolve(v)
        except KeyError as exc:
            raise ParamsError(f"{where}: {k}: {exc.args[0]}") from None
        if cur != new:
            changes[k] = (cur, new)
    return _write(changes, params_file)


def _write(changes: dict[str, tuple[Any, Any]], params_file: Path) -> dict[str, tuple[Any, Any]]:
    from dvc.utils.hydra import apply_overrides

    if not changes:
        return {}
    before = params_file.read_bytes()
    apply_overrides(params_file, [to_override(k, new) for k, (_, new) in changes.items()])
    try:
        load_params(params_file)
    except ParamsError:
        params_file.write_bytes(before)
        raise
    return changes
