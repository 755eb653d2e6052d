"""The release registry on S3 (SeaweedFS locally, any S3 in production), through boto3.

Layout in the releases bucket:

    candidates/<version>/<file>...        every bundle file, uploaded and read back against its SHA-256
    candidates/<version>/manifest.sig     the ed25519 signature (the registry holds signed bundles only)
    candidates/<version>/manifest.json    written LAST: a version without it does not exist for readers
    aliases/<alias>.json                  the pointer: the last event that moved it, with its sequence number
    audit/<alias>/<seq:08d>.json          one object per pointer change, created once, never overwritten

A pointer changes only by a conditional write: `If-None-Match: *` for the first one, `If-Match: <etag>`
after. SeaweedFS honours both (a test proves it, and races 8 writers in separate processes). The pointer
write is the one atomic step; the audit event for sequence n is then created with `If-None-Match: *`, so
only the writer that moved the pointer to n can write it. If a writer dies between the two, the pointer still
holds the whole event, and the next change writes the missing audit object first.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeqa.errors import StageError
from edgeqa_runtime.bundle import MANIFEST, SIGNATURE, read_manifest, verify

ALIASES = ("staging", "production")


class RegistryError(StageError):
    """A registry operation that cannot proceed; the message names the version, alias or object."""


class Conflict(RegistryError):
    """A conditional write lost to a concurrent writer (retried by `promote`)."""


def whoami() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def error_code(exc: Exception) -> str:
    """The S3 error code of a botocore ClientError (empty for anything else)."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


@dataclass
class Registry:
    s3: Any  # a boto3 S3 client
    bucket: str

    # ----------------------------------------------------------------------------------------- versions
    def _key(self, version: str, name: str = "") -> str:
        return f"candidates/{version}/{name}"

    def _get(self, key: str) -> tuple[bytes, str] | None:
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        return r["Body"].read(), r["ETag"]

    def manifest(self, version: str) -> dict[str, Any] | None:
        got = self._get(self._key(version, MANIFEST))
        return None if got is None else json.loads(got[0])

    def publish(self, bundle: Path, on_uploaded: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Upload a signed bundle as `candidates/<version>/`: every file, each read back and checked against
        its SHA-256, then the signature, then the manifest last. Publishing the same manifest again is a no-op
        (`created` False); another bundle under an existing version is refused."""
        bundle = Path(bundle)
        m = verify(bundle)
        version = m.get("version")
        if not version:
            raise RegistryError(f"{bundle / MANIFEST}: no 'version'; build the release bundle first")
        if not (bundle / SIGNATURE).is_file():
            raise RegistryError(f"{bundle / SIGNATURE} is missing: the registry holds signed bundles only "
                                "(edgeqa sign)")
        local = (bundle / MANIFEST).read_bytes()
        existing = self._get(self._key(version, MANIFEST))
        if existing is not None:
            if existing[0] == local:
                return {"version": version, "created": False}
            raise RegistryError(f"version {version} is already published with another manifest "
                                f"(s3://{self.bucket}/{self._key(version, MANIFEST)}); versions are immutable")
        for name, entry in sorted(m["files"].items()) + [(SIGNATURE, None)]:
            data = (bundle / name).read_bytes()
            key = self._key(version, name)
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
            back = self._get(key)
            want = hashlib.sha256(data).hexdigest() if entry is None else entry["sha256"]
            if back is None or hashlib.sha256(back[0]).hexdigest() != want:
                raise RegistryError(f"s3://{self.bucket}/{key}: read back with another SHA-256 than {want}; "
                                    "the upload was damaged, publish again")
            if on_uploaded:
                on_uploaded(name)
        self.s3.put_object(Bucket=self.bucket, Key=self._key(version, MANIFEST), Body=local)
        return {"version": version, "created": True}

    def versions(self) -> list[dict[str, Any]]:
        """Every complete version (one with a manifest), oldest first by the manifest's upload time."""
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="candidates/"):
            for obj in page.get("Contents", []):
                parts = obj["Key"].split("/")
                if len(parts) == 3 and parts[2] == MANIFEST:
                    out.append({"version": parts[1], "published": obj["LastModified"].isoformat()})
        return sorted(out, key=lambda v: (v["published"], v["version"]))

    def download(self, version: str, dest: Path) -> Path:
        """The version's files into a new folder `dest`, verified against the manifest (hashes)."""
        m = self.manifest(version)
        if m is None:
            raise RegistryError(f"no version {version!r} in s3://{self.bucket}/candidates/ (a version without "
                                "a manifest is incomplete and does not exist)")
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=False)
        for name in [*m["files"], SIGNATURE, MANIFEST]:
            got = self._get(self._key(version, name))
            if got is None:
                raise RegistryError(f"s3://{self.bucket}/{self._key(version, name)} is missing")
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(got[0])
        read_manifest(dest)
        verify(dest)
        return dest

    # ----------------------------------------------------------------------------------------- aliases
    def pointer(self, alias: str) -> tuple[dict[str, Any] | None, str | None]:
        _alias(alias)
        got = self._get(f"aliases/{alias}.json")
        return (None, None) if got is None else (json.loads(got[0]), got[1])

    def audit(self, alias: str) -> list[dict[str, Any]]:
        _alias(alias)
        events = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"audit/{alias}/"):
            for obj in page.get("Contents", []):
                got = self._get(obj["Key"])
                if got is not None:
                    events.append(json.loads(got[0]))
        return sorted(events, key=lambda e: e["seq"])

    def records(self, kind: str, version: str) -> list[dict[str, Any]]:
        """The records kept once per version under `decisions/` (signed decisions) or `refusals/` (decisions
        the release flow refused), in key order."""
        if kind not in ("decisions", "refusals"):
            raise RegistryError(f"records {kind!r}: allowed are decisions, refusals")
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=f"{kind}/{version}/"):
            for obj in page.get("Contents", []):
                got = self._get(obj["Key"])
                if got is not None:
                    out.append({"key": obj["Key"], **json.loads(got[0])})
        return out

    def _write_audit(self, event: dict[str, Any]) -> None:
        key = f"audit/{event['alias']}/{event['seq']:08d}.json"
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(event, sort_keys=True).encode(),
                               IfNoneMatch="*")
        except Exception as exc:
            if error_code(exc) != "PreconditionFailed":
                raise  # an existing event is never overwritten: there it was already written (a repair race)

    def _move(self, alias: str, to: str, who: str, reason: str, gate_report_sha256: str | None,
              action: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """One attempt: read the pointer, repair its audit event if missing, write the new pointer
        conditionally (Conflict if another writer won), then its audit event."""
        current, etag = self.pointer(alias)
        if current is not None:
            self._write_audit(current)  # no-op unless a writer died between its pointer and its audit event
        event = {"alias": alias, "seq": (current["seq"] + 1) if current else 1, "action": action,
                 "from": current["to"] if current else None, "to": to, "who": who, "when": _now(),
                 "reason": reason, "gate_report_sha256": gate_report_sha256, **(extra or {})}
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.s3.put_object(Bucket=self.bucket, Key=f"aliases/{alias}.json",
                               Body=json.dumps(event, sort_keys=True).encode(), **cond)
        except Exception as exc:
            if error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Conflict(f"aliases/{alias}.json changed while promoting {to}") from None
            raise
        self._write_audit(event)
        return event

    def promote(self, version: str, alias: str, who: str | None = None, reason: str = "",
                gate_report_sha256: str | None = None, attempts: int = 50, action: str = "promote",
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Point `alias` at a published version; every change is one audit event. A concurrent change is
        never lost: the write is conditional and retried on the new pointer."""
        _alias(alias)
        if self.manifest(version) is None:
            raise RegistryError(f"no version {version!r} in s3://{self.bucket}/candidates/: publish it first")
        for _ in range(attempts):
            try:
                return self._move(alias, version, who or whoami(), reason, gate_report_sha256, action, extra)
            except Conflict:
                continue
        raise RegistryError(f"aliases/{alias}.json kept changing: gave up after {attempts} attempts")

    def rollback(self, alias: str = "production", who: str | None = None, reason: str = "") -> dict[str, Any]:
        """Point `alias` back at the version it held before its current one."""
        current, _ = self.pointer(alias)
        if current is None or current["from"] is None:
            raise RegistryError(f"{alias} has no previous version to roll back to"
                                + ("" if current else " (it was never set)"))
        return self.promote(current["from"], alias, who, reason or f"rollback from {current['to']}",
                            current.get("gate_report_sha256"), action="rollback")


def _alias(alias: str) -> None:
    if alias not in ALIASES:
        raise RegistryError(f"alias {alias!r}: allowed aliases are {', '.join(ALIASES)}")
