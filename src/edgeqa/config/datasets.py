"""Where the real datasets live: one definition, used by profiles, benchmarks and tests alike.

Precedence: the environment variable (EDGEQA_MTILE_ROOT), then a value the caller read from params, then the
default beside the project (`../shared/datasets/magnetic-tile`). A profile names a dataset as `dataset:NAME`
(e.g. `ingest.root: dataset:mtile`); applying the profile writes the resolved path into params.yaml, so the
path DVC tracks is the path the stages read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "dataset:"


@dataclass(frozen=True)
class Dataset:
    env: str
    default: str  # relative to the project root
    description: str


DATASETS: dict[str, Dataset] = {
    "mtile": Dataset("EDGEQA_MTILE_ROOT", "../shared/datasets/magnetic-tile",
                     "real magnetic-tile photographs with defect masks (read in place, never copied)"),
}


def dataset_root(name: str, params_value: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The location of dataset `name` as a path string (relative to the project root unless absolute)."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    d = DATASETS[name]
    env = os.environ if env is None else env
    return env.get(d.env) or params_value or d.default


def resolve(value: object) -> object:
    """`dataset:NAME` -> the dataset's location; any other value unchanged."""
    if isinstance(value, str) and value.startswith(PREFIX):
        return dataset_root(value.removeprefix(PREFIX))
    return value


def dataset_path(name: str, project: Path) -> Path:
    """The dataset's folder as an absolute path, for a project root."""
    p = Path(dataset_root(name))
    return p if p.is_absolute() else (project / p).resolve()
