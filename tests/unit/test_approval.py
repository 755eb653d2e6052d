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
