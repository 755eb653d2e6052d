"""Bundle signatures: the release key (edgeqa.release.signing) and the device's check against its own trust
anchor (edgeqa_runtime.trust). Real ed25519 keys, real bundle manifests, no mocks."""

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeqa.errors import StageError
from edgeqa.release import signing
from edgeqa_runtime.bundle import SIGNATURE, BundleError, write_manifest
from edgeqa_runtime.trust import ENV_FILE, ENV_TEXT, key_id, public_pem, verify_trusted


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch, tmp_path):
    for var in (ENV_FILE, ENV_TEXT, signing.ENV_KEY, signing.ENV_KEY_FILE):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture
def bundle(tmp_path):
    b = tmp_path / "edge"
    b.mkdir()
    (b / "vision.onnx").write_bytes(os.urandom(4096))
    (b / "runtime.json").write_text('{"threshold": 0.4}')
    write_manifest(b, source="distill", version="distill-abc")
    return b


def _trust_file(tmp_path, *keys):
    f = tmp_path / "device" / "trusted.pem"
    f.parent.mkdir(exist_ok=True)
    f.write_text("".join(public_pem(k.public_key()) for k in keys))
    return f


def test_the_key_is_created_once_with_mode_600_and_reused(tmp_path):
    key, origin = signing.load_or_create()
    path = tmp_path / "config" / "edgeqa" / "release-signing-key.pem"
    assert origin == str(path) and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, _ = signing.load_or_create()
    assert key_id(again.public_key()) == key_id(key.public_key())


def test_a_key_file_others_can_read_is_refused(tmp_path):
    signing.load_or_create()
    path = tmp_path / "config" / "edgeqa" / "release-signing-key.pem"
    path.chmod(0o644)
    with pytest.raises(StageError, match=r"permissions 0644 are too open.*chmod 600"):
        signing.load_or_create()


def test_the_key_can_come_from_the_environment(monkeypatch, tmp_path):
    k = Ed25519PrivateKey.generate()
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode()
    monkeypatch.setenv(signing.ENV_KEY, pem)
    key, origin = signing.load_or_create()
    assert origin == "$EDGEQA_SIGNING_KEY" and key_id(key.public_key()) == key_id(k.public_key())
    assert not (tmp_path / "config").exists(), "no key file is created when the environment holds the key"
    monkeypatch.setenv(signing.ENV_KEY, "not a key")
    with pytest.raises(StageError, match=r"\$EDGEQA_SIGNING_KEY: not an unencrypted PEM private key"):
        signing.load_or_create()


def test_a_signed_copy_verifies_against_the_device_trust_file(bundle, tmp_path):
    key, _ = signing.load_or_create()
    rec = signing.sign_copy(bundle, tmp_path / "signed", key)
    assert not (bundle / SIGNATURE).exists(), "the source bundle (a DVC output) is never touched"
    m = verify_trusted(tmp_path / "signed", _trust_file(tmp_path, key))
    assert m["_trust"] == {"checked": True, "key_id": rec["key_id"], "anchor": str(tmp_path / "device" /
                                                                                  "trusted.pem")}
    with pytest.raises(StageError, match="already exists"):
        signing.sign_copy(bundle, tmp_path / "signed", key)


def test_the_trust_anchor_can_be_an_environment_variable_with_several_keys(bundle, tmp_path, monkeypatch):
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signing.sign_copy(bundle, tmp_path / "signed", key)
    monkeypatch.setenv(ENV_TEXT, public_pem(other.public_key()) + public_pem(key.public_key()))
    assert verify_trusted(tmp_path / "signed")["_trust"]["key_id"] == key_id(key.public_key())


def test_a_manifest_altered_after_signing_is_refused(bundle, tmp_path):
    key = Ed25519PrivateKey.generate()
    signing.sign_copy(bundle, tmp_path / "signed", key)
    m = json.loads((tmp_path / "signed" / "manifest.json").read_text())
    m["version"] = "distill-evil"
    (tmp_path / "signed" / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    with pytest.raises(BundleError, match=r"manifest\.sig: the signature does not match .*manifest\.json"):
        verify_trusted(tmp_path / "signed", _trust_file(tmp_path, key))


def test_a_file_altered_after_signing_is_refused_by_its_hash(bundle, tmp_path):
    key = Ed25519PrivateKey.generate()
    signing.sign_copy(bundle, tmp_path / "signed", key)
    (tmp_path / "signed" / "runtime.json").write_text('{"threshold": 0.0}')
    with pytest.raises(BundleError, match=r"runtime\.json does not match its SHA-256"):
        verify_trusted(tmp_path / "signed", _trust_file(tmp_path, key))


def test_a_bundle_signed_by_an_untrusted_key_is_refused_even_if_it_carries_that_key(bundle, tmp_path):
    mallory, device_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    # the attacker ships their own public key inside the bundle: the device never reads keys from a bundle
    (bundle / "trusted.pem").write_text(public_pem(mallory.public_key()))
    write_manifest(bundle, source="distill", version="distill-abc")
    signing.sign_copy(bundle, tmp_path / "signed", mallory)
    with pytest.raises(BundleError, match=rf"signed by key {key_id(mallory.public_key())}, which is not among "
                                          "this device's trusted keys"):
        verify_trusted(tmp_path / "signed", _trust_file(tmp_path, device_key))


def test_an_unsigned_bundle_is_refused_where_the_device_has_a_trust_anchor(bundle, tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.sig is missing: the bundle is unsigned"):
        verify_trusted(bundle, _trust_file(tmp_path, Ed25519PrivateKey.generate()))


def test_without_a_trust_anchor_the_signature_is_not_checked_unless_required(bundle, tmp_path):
    assert verify_trusted(bundle)["_trust"] == {"checked": False}
    with pytest.raises(BundleError, match="no trusted keys configured"):
        verify_trusted(bundle, require=True)


@pytest.mark.parametrize(("content", "match"), [
    ("hello", r"no PEM public key"),
    ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", r"public key 1 is not valid PEM"),
])
def test_a_bad_trust_file_is_named(bundle, tmp_path, content, match):
    f = tmp_path / "trusted.pem"
    f.write_text(content)
    with pytest.raises(BundleError, match=rf"{f}: {match}"):
        verify_trusted(bundle, f)
    with pytest.raises(BundleError, match="trusted-keys file does not exist"):
        verify_trusted(bundle, tmp_path / "nope.pem")


def test_a_forged_signature_record_is_refused(bundle, tmp_path):
    key = Ed25519PrivateKey.generate()
    signing.sign_copy(bundle, tmp_path / "signed", key)
    sig = tmp_path / "signed" / SIGNATURE
    rec = json.loads(sig.read_text())
    sig.write_text(json.dumps({**rec, "signature": "!!!"}))
    with pytest.raises(BundleError, match=r"manifest\.sig: unreadable"):
        verify_trusted(tmp_path / "signed", _trust_file(tmp_path, key))
    sig.write_text(json.dumps({**rec, "alg": "rsa"}))
    with pytest.raises(BundleError, match="only ed25519"):
        verify_trusted(tmp_path / "signed", _trust_file(tmp_path, key))
