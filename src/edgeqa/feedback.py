"""The loop back from the line: prediction logs (`edgeqa predict --log`, `edgeqa-edge predict --log`) uploaded
to S3 under `feedback/`, where drift checks and reviews read them.

An upload is content-addressed (`feedback/<device>/<first day>-<sha256[:16]>.jsonl`), written only if absent,
so pushing the same log twice stores it once. Every line is checked before anything is uploaded; a bad line
stops the push and is named by its line number.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from edgeqa.errors import StageError

PREFIX = "feedback/"
_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def push(s3: Any, bucket: str, log: Path, device: str, rotate: bool = True) -> dict[str, Any]:
    """Upload the prediction log `log` for `device`; with `rotate`, then rename it to `<log>.<sha8>.pushed` so
    the next predictions start a new log. {key, lines, new}."""
    from botocore.exceptions import ClientError

    from edgeqa_runtime.predlog import LogError, read

    if not _DEVICE.match(device):
        raise StageError(f"--device {device!r}: 1-63 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    if not log.is_file():
        raise StageError(f"{log}: no such prediction log (`edgeqa predict --log FILE` writes one)")
    try:
        lines = list(read(log))
    except LogError as exc:
        raise StageError(f"{exc}; nothing was uploaded") from None
    if not lines:
        raise StageError(f"{log}: no predictions in the log; nothing to upload")
    body = "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines).encode()
    digest = hashlib.sha256(body).hexdigest()
    key = f"{PREFIX}{device}/{min(x['ts'] for x in lines)[:10]}-{digest[:16]}.jsonl"
    new = True
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*", ContentType="application/x-ndjson",
                      Metadata={"sha256": digest, "lines": str(len(lines))})
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
            raise StageError(f"uploading {log} to s3://{bucket}/{key} failed: {exc}") from None
        new = False  # the same content was pushed before: stored once
    if rotate:
        log.replace(log.with_name(f"{log.name}.{digest[:8]}.pushed"))
    return {"key": key, "lines": len(lines), "new": new, "uri": f"s3://{bucket}/{key}"}


def batches(s3: Any, bucket: str, device: str | None = None) -> list[dict[str, Any]]:
    """The uploaded prediction logs (all devices, or one), oldest key first."""
    prefix = PREFIX + (f"{device}/" if device else "")
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [{"key": o["Key"], "bytes": o["Size"]} for o in page.get("Contents", [])]
    return sorted(out, key=lambda o: o["key"])


def load(s3: Any, bucket: str, keys: list[str]) -> list[dict[str, Any]]:
    """The checked lines of uploaded logs, in key order."""
    from edgeqa_runtime.predlog import LogError, check

    out = []
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        for i, raw in enumerate(body.splitlines(), 1):
            try:
                out.append(check(json.loads(raw), f"s3://{bucket}/{key}:{i}"))
            except (ValueError, LogError) as exc:
                raise StageError(str(exc) if isinstance(exc, LogError) else
                                 f"s3://{bucket}/{key}:{i}: not a JSON line") from None
    return out
