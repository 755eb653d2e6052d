"""Signed reviewer decisions (edgeqa.release.approval) and the reviewers allow-list in params."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeqa.config import ParamsError, Reviewer, parse_params
from edgeqa.release.approval import ApprovalError, reviewer_entry, sign_decision, verify_decision
from edgeqa_runtime.trust import public_pem

from .test_config import _raw

ALICE, BOB = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
STAGING = {"seq": 4, "to": "v1", "gate_report_sha256": "g" * 64}


def _reviewers():
    return [Reviewer(name="alice", role="quality engineer", public_key=public_pem(ALICE.public_key())),
            Reviewer(name="bob", role="mlops", public_key=public_pem(BOB.public_key()))]


def test_a_decision_names_its_signer_role_version_and_staging_event():
    rec = sign_decision(ALICE, _reviewers(), "v1", "approve", "ok", STAGING)
    d = rec["decision"]
    assert (d["reviewer"], d["role"], d["version"], d["decision"], d["staging_seq"]) == (
        "alice", "quality engineer", "v1", "approve", 4)
    assert d["gate_report_sha256"] == STAGING["gate_report_sha256"] and d["when"]
    assert verify_decision(rec, _reviewers()).name == "alice"


@pytest.mark.parametrize(("field", "value"), [("version", "v2"), ("decision", "reject"), ("comment", "other"),
                                              ("staging_seq", 5), ("role", "admin")])
def test_a_decision_altered_after_signing_is_refused(field, value):
    rec = sign_decision(BOB, _reviewers(), "v1", "approve", "ok", STAGING)
    rec["decision"][field] = value
    with pytest.raises(ApprovalError, match="altered after signing"):
        verify_decision(rec, _reviewers())


def test_a_key_off_the_allow_list_cannot_sign_or_be_verified():
    mallory = Ed25519PrivateKey.generate()
    with pytest.raises(ApprovalError, match="is not on the allow-list release.reviewers.*alice, bob"):
        sign_decision(mallory, _reviewers(), "v1", "approve", "", STAGING)
    rec = sign_decision(ALICE, _reviewers(), "v1", "approve", "", STAGING)
    with pytest.raises(ApprovalError, match="not on the allow-list"):
        verify_decision(rec, _reviewers()[1:])  # alice removed from the list since


def test_a_decision_claiming_another_reviewers_name_is_refused():
    rec = sign_decision(ALICE, _reviewers(), "v1", "approve", "", STAGING)
    swapped = [Reviewer(name="bob", role="mlops", public_key=public_pem(ALICE.public_key()))]
    with pytest.raises(ApprovalError, match="names alice .* belongs to bob"):
        verify_decision(rec, swapped)


def test_only_approve_or_reject():
    with pytest.raises(ApprovalError, match="allowed are approve, reject"):
        sign_decision(ALICE, _reviewers(), "v1", "ship-it", "", STAGING)


def test_the_allow_list_in_params_takes_only_ed25519_pem_keys_once_each():
    raw = _raw()
    raw["release"]["reviewers"] = [{"name": "alice", "role": "qe", "public_key": "not a key"}]
    with pytest.raises(ParamsError, match=r"release\.reviewers\[0\]\.public_key: .*not a PEM public key"):
        parse_params(raw)
    pem = public_pem(ALICE.public_key())
    raw["release"]["reviewers"] = [{"name": "alice", "role": "qe", "public_key": pem},
                                   {"name": "bob", "role": "qe", "public_key": pem}]
    with pytest.raises(ParamsError, match="each reviewer needs their own key"):
        parse_params(raw)
    import yaml

    # the entry `edgeqa keys reviewer` prints pastes under `release:` / `  reviewers:` as is
    pasted = yaml.safe_load("release:\n  reviewers:\n" + reviewer_entry("alice", "quality engineer", pem))
    raw["release"]["reviewers"] = pasted["release"]["reviewers"]
    assert parse_params(raw).release.reviewers[0].role == "quality engineer"


# ------------------------------------------------------------------------ the deadline and one-time UI tokens
def _staging(**kw):
    import datetime as dt

    end = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    return {**STAGING, "approval_deadline": end.isoformat(timespec="seconds"), **kw}


def test_a_request_past_its_deadline_takes_no_decision_and_no_token():
    from edgeqa.release.approval import RequestClosed, _check_open, issue_token

    late = _staging(approval_deadline="2020-01-01T00:00:00+00:00")
    with pytest.raises(RequestClosed, match="expired at 2020-01-01T00:00:00.*a timeout counts as a rejection"):
        _check_open("v1", late)
    with pytest.raises(ApprovalError, match="expired"):
        issue_token(ALICE, _reviewers(), "v1", late)
    with pytest.raises(ApprovalError, match="v2 is not on staging \\(staging holds v1\\)"):
        _check_open("v2", _staging())
    assert _check_open("v1", _staging())["seq"] == 4


def test_a_token_works_for_its_reviewer_version_and_request_only():
    from edgeqa.release.approval import issue_token, ui_record, verify_token

    st = _staging()
    token, grant = issue_token(ALICE, _reviewers(), "v1", st)
    assert token not in str(grant) and len(token) >= 32, "only the token's hash is kept"
    assert grant["grant"]["reviewer"] == "alice" and grant["grant"]["expires"] == st["approval_deadline"]
    assert verify_token(grant, token, _reviewers(), "v1", "alice", st).name == "alice"
    with pytest.raises(ApprovalError, match="typed for alice on v1 is wrong"):
        verify_token(grant, token + "x", _reviewers(), "v1", "alice", st)
    with pytest.raises(ApprovalError, match="grant is for alice on v1, not bob on v1"):
        verify_token(grant, token, _reviewers(), "v1", "bob", st)
    with pytest.raises(ApprovalError, match="issued for staging event 4, but staging is at event 5"):
        verify_token(grant, token, _reviewers(), "v1", "alice", _staging(seq=5))
    with pytest.raises(ApprovalError, match="no unused token for alice on v1"):
        verify_token(None, token, _reviewers(), "v1", "alice", st)
    forged = {**grant, "grant": {**grant["grant"], "token_sha256": "0" * 64}}  # a grant rewritten in Prefect
    with pytest.raises(ApprovalError, match="altered after signing"):
        verify_token(forged, token, _reviewers(), "v1", "alice", st)
    rec = ui_record(grant, "approve", "looks right")
    assert rec["decision"]["via"] == "prefect-ui-token" and verify_decision(rec, _reviewers()).name == "alice"
    rec["decision"]["version"] = "v2"  # a UI decision cannot be moved to another version than its grant's
    with pytest.raises(ApprovalError, match="does not match the token grant of alice"):
        verify_decision(rec, _reviewers())


def test_a_token_grant_signed_by_a_stranger_is_refused():
    from edgeqa.release.approval import issue_token, verify_token

    with pytest.raises(ApprovalError, match="not on the allow-list"):
        issue_token(Ed25519PrivateKey.generate(), _reviewers(), "v1", _staging())
    token, grant = issue_token(BOB, _reviewers(), "v1", _staging())
    with pytest.raises(ApprovalError, match="not on the allow-list"):
        verify_token(grant, token, _reviewers()[:1], "v1", "bob", _staging())  # bob removed since
