"""Signed reviewer decisions: `production` moves only on an approval signed by a reviewer on the allow-list.

In open-source Prefect a name typed into a form is just a string. Here each reviewer holds an ed25519 key
(`edgeqa keys reviewer NAME`, mode 600, outside git), and `release.reviewers` in params.yaml holds each
reviewer's name, role and public key: the allow-list is versioned and reviewed like the code. A decision
(approve or reject) names the version, the reviewer, the role, a comment, and the `staging` audit event it
answers. Binding it to that event means it cannot be replayed onto a later candidate. The registry keeps the
decision and its signature in `decisions/<version>/`, created once, and an approval's audit event on
`production` carries both, so anyone with params.yaml can check who approved, when and with what role.

The request has a deadline (`release.approval_timeout_s`, kept in the `staging` event): a decision after it
is refused, so a timeout counts as a rejection.

The Prefect UI form cannot sign, so it takes a one-time token instead. `edgeqa approval-token VERSION
--reviewer NAME` makes a random token and a grant (version, reviewer, role, staging event, the token's
SHA-256, expiry) signed with the reviewer's key; only the grant is kept, in a Prefect Secret block. The
release flow checks the grant against the allow-list and the typed token against its hash, and deletes the
block before it acts: a token works once, and what Prefect keeps of the run's input (readable over its API)
is then worthless.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
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


class RequestClosed(ApprovalError):
    """The request takes no decision any more: it expired, or the version is no longer on staging."""


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
    if "grant" in record:  # a UI decision: the reviewer signed the grant of the token that was typed
        g = record["grant"].get("grant") or {}
        r = verify_decision({"decision": g, "key_id": record["grant"].get("key_id"),
                             "signature": record["grant"].get("signature")}, reviewers)
        if (d.get("version"), d.get("reviewer"), d.get("staging_seq")) != (g.get("version"), r.name,
                                                                           g.get("staging_seq")):
            raise ApprovalError(f"the UI decision on {d.get('version')} does not match the token grant of {r.name} "
                                f"({g.get('version')}, staging event {g.get('staging_seq')})")
        return r
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


def deadline(staging_event: dict[str, Any]) -> dt.datetime | None:
    d = staging_event.get("approval_deadline")
    return dt.datetime.fromisoformat(d) if d else None


def _check_open(version: str, staging_event: dict[str, Any] | None) -> dict[str, Any]:
    if staging_event is None or staging_event["to"] != version:
        held = staging_event["to"] if staging_event else "nothing"
        raise RequestClosed(f"{version} is not on staging (staging holds {held}): only the version on staging can be "
                            "approved or rejected")
    end = deadline(staging_event)
    if end is not None and dt.datetime.now(dt.UTC) > end:
        raise RequestClosed(f"the approval request for {version} expired at {end.isoformat()} "
                            "(release.approval_timeout_s): a timeout counts as a rejection; release again")
    return staging_event


def record(reg: Registry, reviewers: list[Reviewer], rec: dict[str, Any]) -> dict[str, Any]:
    """Keep a decision record (signed by a reviewer, or a UI decision carrying a reviewer's signed token grant)
    for the version on `staging` now; an approval moves `production` to it."""
    d = rec.get("decision") or {}
    version = str(d.get("version"))
    staging = _check_open(version, reg.pointer("staging")[0])
    r = verify_decision(rec, reviewers)
    if d.get("staging_seq") != staging["seq"]:
        raise ApprovalError(f"the decision by {r.name} answers staging event {d.get('staging_seq')}, but staging is "
                            f"at event {staging['seq']}: a decision cannot be replayed onto a later request")
    name = f"decisions/{version}/{staging['seq']:08d}-{rec['key_id']}.json"
    try:
        reg.s3.put_object(Bucket=reg.bucket, Key=name, Body=json.dumps(rec, sort_keys=True).encode(),
                          IfNoneMatch="*")
    except Exception as exc:
        if error_code(exc) == "PreconditionFailed":
            raise ApprovalError(f"{r.name} already decided on {version} for staging event {staging['seq']} "
                                f"(s3://{reg.bucket}/{name}); a decision is recorded once") from None
        raise
    out: dict[str, Any] = {"record": rec, "object": name, "event": None, "reviewer": r.name, "role": r.role}
    if d.get("decision") == "approve":
        try:
            out["event"] = reg.promote(version, "production", who=f"{r.name} ({r.role})", reason=d.get("comment", ""),
                                       gate_report_sha256=staging.get("gate_report_sha256"), action="approve",
                                       extra={"approval": rec})
        except RegistryError as exc:
            raise ApprovalError(str(exc)) from None
    return out


def decide(reg: Registry, reviewers: list[Reviewer], key: Ed25519PrivateKey, version: str, decision: str,
           comment: str) -> dict[str, Any]:
    """Record a signed decision on the version now on `staging`; an approval moves `production` to it."""
    staging = _check_open(version, reg.pointer("staging")[0])
    return record(reg, reviewers, sign_decision(key, reviewers, version, decision, comment, staging))


# ---------------------------------------------------------------------------------------- one-time UI tokens
def token_block_name(version: str, reviewer: str) -> str:
    """The Prefect Secret block that holds the grant of `reviewer`'s token for `version` (lowercase, dashes)."""
    return "edgeqa-approval-" + hashlib.sha256(f"{version}|{reviewer}".encode()).hexdigest()[:20]


def issue_token(key: Ed25519PrivateKey, reviewers: list[Reviewer], version: str, staging_event: dict[str, Any]
                ) -> tuple[str, dict[str, Any]]:
    """A one-time token for the UI form and its grant, signed by the reviewer whose key this is. Keep the grant
    (it holds only the token's hash); hand the token to the reviewer."""
    staging = _check_open(version, staging_event)
    r = reviewer_for(key, reviewers)
    token = secrets.token_urlsafe(24)
    end = deadline(staging)
    g = {"kind": "ui-token", "version": version, "reviewer": r.name, "role": r.role, "staging_seq": staging["seq"],
         "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
         "expires": end.isoformat() if end else None,
         "issued": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return token, {"grant": g, "key_id": key_id(key.public_key()),
                   "signature": base64.b64encode(key.sign(_canonical(g))).decode()}


def verify_token(grant: dict[str, Any] | None, token: str, reviewers: list[Reviewer], version: str, reviewer: str,
                 staging_event: dict[str, Any]) -> Reviewer:
    """The reviewer a UI decision comes from, if `token` matches a grant they signed for this request."""
    if grant is None:
        raise ApprovalError(f"no unused token for {reviewer} on {version}: ask them for one (`edgeqa approval-token "
                            f"{version} --reviewer {reviewer}`); a token works once")
    g = grant.get("grant") or {}
    r = verify_decision({"decision": g, "key_id": grant.get("key_id"), "signature": grant.get("signature")},
                        reviewers)
    if (g.get("version"), g.get("reviewer")) != (version, reviewer) or r.name != reviewer:
        raise ApprovalError(f"the token grant is for {g.get('reviewer')} on {g.get('version')}, not {reviewer} on "
                            f"{version}")
    if g.get("staging_seq") != staging_event["seq"]:
        raise ApprovalError(f"the token of {reviewer} was issued for staging event {g.get('staging_seq')}, but "
                            f"staging is at event {staging_event['seq']}")
    if not secrets.compare_digest(hashlib.sha256(token.encode()).hexdigest(), str(g.get("token_sha256"))):
        raise ApprovalError(f"the token typed for {reviewer} on {version} is wrong")
    return r


def ui_record(grant: dict[str, Any], decision: str, comment: str) -> dict[str, Any]:
    """The decision made in the UI form: what was typed, and the reviewer's signed grant that authorised it."""
    if decision not in DECISIONS:
        raise ApprovalError(f"decision {decision!r}: allowed are {', '.join(DECISIONS)}")
    g = grant["grant"]
    d = {"version": g["version"], "decision": decision, "reviewer": g["reviewer"], "role": g["role"],
         "comment": comment, "staging_seq": g["staging_seq"], "via": "prefect-ui-token",
         "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    return {"decision": d, "key_id": grant["key_id"], "grant": grant}


def reviewer_entry(name: str, role: str, public_pem: str) -> str:
    """The params.yaml entry for a reviewer (printed by `edgeqa keys reviewer`)."""
    pem = "\n".join(f"        {line}" for line in public_pem.strip().splitlines())
    return f"    - name: {name}\n      role: {role}\n      public_key: |\n{pem}\n"


def key_path(name: str) -> Path:
    """Where `edgeqa keys reviewer NAME` keeps the reviewer's private key (mode 600, outside any git tree)."""
    import os

    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edgeqa" / f"reviewer-{name}.pem"
