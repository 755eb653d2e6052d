"""Signed reviewer decisions: `production` moves only on an approval signed by a reviewer on the allow-list.

In open-source Prefect a name typed into a form is just a string. Here each reviewer holds an ed25519 key
(`edgeqa keys reviewer NAME`, mode 600, outside git), and `release.reviewers` in params.yaml holds each
reviewer's name, role and public key: the allow-list is versioned and reviewed like the code. A decision
(approve or reject) names the version, the reviewer, the role, a comment, and the `staging` audit event it
answers. Binding it to that event means it cannot be replayed onto a later candidate. The registry keeps the
decision and its signature in `decisions/<version>/`, created once, and an approval's audit event on
`production` carries both, so anyone with params.yaml can check who approved, when and with what role.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeqa.config import Reviewer
from edgeqa.errors import StageError
from edgeqa.release.registry import Registry, RegistryError, error_code
from edgeqa_runtime.trust import key_id, parse_trusted

DECISIONS = ("approve", "reject")


class ApprovalError(StageError):
    """A decision that is refused; the message names the reviewer, key, version or event and why."""


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def reviewer_for(key: Ed25519PrivateKey, reviewers: list[Reviewer]) -> Reviewer:
    kid = key_id(key.public_key())
    for r in reviewers:
        if kid in parse_trusted(r.public_key, f"release.reviewers[{r.name}].public_key"):
            return r
    names = ", ".join(r.name for r in reviewers) or "nobody yet"
    raise ApprovalError(f"key {kid} is not on the allow-list release.reviewers in params.yaml (reviewers: {names}); "
                        "add its public key there (`edgeqa keys reviewer NAME` prints the entry) and commit it")


def sign_decision(key: Ed25519PrivateKey, reviewers: list[Reviewer], version: str, decision: str, comment: str,
                  staging_event: dict[str, Any]) -> dict[str, Any]:
    """A decision record signed by the reviewer whose key this is."""
    if decision not in DECISIONS:
        raise ApprovalError(f"decision {decision!r}: allowed are {', '.join(DECISIONS)}")
    r = reviewer_for(key, reviewers)
    d = {"version": version, "decision": decision, "reviewer": r.name, "role": r.role, "comment": comment,
         "staging_seq": staging_event["seq"], "gate_report_sha256": staging_event.get("gate_report_sha256"),
         "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return {"decision": d, "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(_canonical(d))).decode()}


def verify_decision(record: dict[str, Any], reviewers: list[Reviewer]) -> Reviewer:
    """The reviewer who signed `record`, or an ApprovalError naming what does not hold."""
    d, kid = record.get("decision") or {}, record.get("key_id")
    for r in reviewers:
        keys = parse_trusted(r.public_key, f"release.reviewers[{r.name}].public_key")
        if kid in keys:
            try:
                keys[kid].verify(base64.b64decode(record.get("signature", "")), _canonical(d))
            except (InvalidSignature, ValueError):
                raise ApprovalError(f"the decision on {d.get('version')} by key {kid} does not match its signature: "
                                    "it was altered after signing") from None
            if (d.get("reviewer"), d.get("role")) != (r.name, r.role):
                raise ApprovalError(f"the decision names {d.get('reviewer')} ({d.get('role')}) but key {kid} belongs "
                                    f"to {r.name} ({r.role})")
            return r
    raise ApprovalError(f"the decision on {d.get('version')} is signed by key {kid}, which is not on the allow-list "
                        "release.reviewers")


def decide(reg: Registry, reviewers: list[Reviewer], key: Ed25519PrivateKey, version: str, decision: str,
           comment: str) -> dict[str, Any]:
    """Record a signed decision on the version now on `staging`; an approval moves `production` to it."""
    staging, _ = reg.pointer("staging")
    if staging is None or staging["to"] != version:
        raise ApprovalError(f"{version} is not on staging (staging holds {staging['to'] if staging else 'nothing'}): "
                            "only the version on staging can be approved or rejected")
    rec = sign_decision(key, reviewers, version, decision, comment, staging)
    r = verify_decision(rec, reviewers)
    name = f"decisions/{version}/{staging['seq']:08d}-{rec['key_id']}.json"
    try:
        reg.s3.put_object(Bucket=reg.bucket, Key=name, Body=json.dumps(rec, sort_keys=True).encode(),
                          IfNoneMatch="*")
    except Exception as exc:
        if error_code(exc) == "PreconditionFailed":
            raise ApprovalError(f"{r.name} already decided on {version} for staging event {staging['seq']} "
                                f"(s3://{reg.bucket}/{name}); a decision is recorded once") from None
        raise
    out: dict[str, Any] = {"record": rec, "object": name, "event": None}
    if decision == "approve":
        try:
            out["event"] = reg.promote(version, "production", who=f"{r.name} ({r.role})", reason=comment,
                                       gate_report_sha256=staging.get("gate_report_sha256"), action="approve",
                                       extra={"approval": rec})
        except RegistryError as exc:
            raise ApprovalError(str(exc)) from None
    return out


def reviewer_entry(name: str, role: str, public_pem: str) -> str:
    """The params.yaml entry for a reviewer (printed by `edgeqa keys reviewer`)."""
    pem = "\n".join(f"        {line}" for line in public_pem.strip().splitlines())
    return f"    - name: {name}\n      role: {role}\n      public_key: |\n{pem}\n"


def key_path(name: str) -> Path:
    """Where `edgeqa keys reviewer NAME` keeps the reviewer's private key (mode 600, outside any git tree)."""
    import os

    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edgeqa" / f"reviewer-{name}.pem"
