"""The prediction log: what a device answered, appended one JSON line per answered image, so the line's answers can
come back for drift checks and retraining (`edgeqa feedback push` uploads a log to S3).

A line: `ts` (UTC, ISO 8601), `image_sha256` (of the file's bytes), `width`, `height`, `path`, `verdict`, `type`,
`location`, `p_defective`, `bundle` (the bundle's version), `host`; and, in logs written since they were added,
`brightness` and `contrast` (mean and standard deviation of the grayscale image, 0-255) and `embedding` (the mean
of the model's image tokens, what drift compares with the training images' mean). Lines are appended with one write
each to a file opened in append mode, so concurrent writers never interleave inside a line; a crash can leave at
most a last line without its newline, which `read` skips.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeqa_runtime.files import sha256_file

FIELDS = ("ts", "image_sha256", "width", "height", "path", "verdict", "type", "location", "p_defective", "bundle",
          "host")
OPTIONAL = ("brightness", "contrast", "embedding")  # absent from logs written before they were measured
EMBED_DECIMALS = 5


def image_stats(path: Path) -> tuple[int, int, float, float]:
    """(width, height, brightness, contrast) of an image file: the grayscale mean and standard deviation."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        g = np.asarray(im.convert("L"), dtype=np.float64)
    return width, height, round(float(g.mean()), 3), round(float(g.std()), 3)


class LogError(ValueError):
    """A prediction log line that is not a prediction; the message names the file and line."""


def entry(path: Path, rec: dict[str, Any], embedding: Any = None) -> dict[str, Any]:
    """The log line for one answered image (`rec` as `edgeqa_runtime.cli.record` builds it; `embedding` the
    model's mean image token, when the caller has it)."""
    width, height, brightness, contrast = image_stats(path)
    line = {"ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "image_sha256": sha256_file(path),
            "width": width, "height": height, "path": str(path), "verdict": rec["verdict"], "type": rec["type"],
            "location": rec["location"], "p_defective": rec["p_defective"], "bundle": rec["bundle"],
            "host": socket.gethostname(), "brightness": brightness, "contrast": contrast}
    if embedding is not None:
        line["embedding"] = [round(float(x), EMBED_DECIMALS) for x in embedding]
    return line


class Appender:
    """Append lines to a prediction log (created with its folder if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(line, sort_keys=True) + "\n").encode())

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


def check(line: Any, where: str) -> dict[str, Any]:
    if not isinstance(line, dict) or not set(FIELDS) <= set(line) <= set(FIELDS) | set(OPTIONAL):
        got = sorted(line) if isinstance(line, dict) else type(line).__name__
        raise LogError(f"{where}: a prediction line has exactly the fields {list(FIELDS)}, and optionally "
                       f"{list(OPTIONAL)}; got {got}")
    for k in ("brightness", "contrast"):
        v = line.get(k, 0.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 255.0:
            raise LogError(f"{where}: {k} {v!r} is not a grayscale statistic in [0, 255]")
    emb = line.get("embedding", [0.0])
    if not (isinstance(emb, list) and emb and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  and x == x and abs(x) != float("inf") for x in emb)):
        raise LogError(f"{where}: embedding is not a non-empty list of finite numbers")
    if line["verdict"] not in ("good", "defective"):
        raise LogError(f"{where}: verdict {line['verdict']!r}; allowed: good, defective")
    p = line["p_defective"]
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise LogError(f"{where}: p_defective {p!r} is not a probability in [0, 1]")
    for k in ("width", "height"):
        if not isinstance(line[k], int) or isinstance(line[k], bool) or line[k] < 1:
            raise LogError(f"{where}: {k} {line[k]!r} is not a size in pixels")
    h = line["image_sha256"]
    if not (isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)):
        raise LogError(f"{where}: image_sha256 {h!r} is not a SHA-256 hex digest")
    return line


def read(path: Path) -> Iterator[dict[str, Any]]:
    """Every line of a log, checked; a last line cut off by a crash (no newline) is skipped, any other bad
    line raises LogError naming its line number."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    cut = lines.pop()  # after the last newline: empty, or a line a crash cut short
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            raise LogError(f"{path}:{i}: not a JSON line") from None
        yield check(obj, f"{path}:{i}")
    if cut.strip():
        try:
            yield check(json.loads(cut), f"{path}:{len(lines) + 1}")
        except (ValueError, LogError):
            pass  # the line a crash cut short: never uploaded as an answer
