"""Bundle signatures, checked against the device's own trust anchor.

A released bundle carries `manifest.sig`: an ed25519 signature of the exact bytes of `manifest.json`, which
in turn holds the SHA-256 of every file. So one signature covers the whole bundle. The keys that may sign
are never taken from the bundle (a bundle that carries the key that verifies it proves nothing): the device
names them in its own config, either a file of PEM public keys (`--trust FILE` or `EDGEQA_TRUSTED_KEYS_FILE`)
or the PEM text itself in `EDGEQA_TRUSTED_KEYS`.

    manifest.sig = {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

`key_id` is the first 16 hex digits of the SHA-256 of the raw 32-byte public key; it only picks the key,
the signature decides.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeqa_runtime.bundle import MANIFEST, SIGNATURE, BundleError, verify

ENV_FILE, ENV_TEXT = "EDGEQA_TRUSTED_KEYS_FILE", "EDGEQA_TRUSTED_KEYS"
_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def parse_trusted(text: str, origin: str) -> dict[str, Ed25519PublicKey]:
    """Every PEM public key in `text` (ed25519 only), by key id; `origin` names the source in errors."""
    blocks = _PEM.findall(text)
    if not blocks:
        raise BundleError(f"{origin}: no PEM public key (-----BEGIN PUBLIC KEY-----) found; the device's trusted "
                          "keys are ed25519 public keys in PEM (`edgeqa keys public` prints the release key's)")
    keys: dict[str, Ed25519PublicKey] = {}
    for i, block in enumerate(blocks, 1):
        try:
            k = serialization.load_pem_public_key(block.encode())
        except ValueError as exc:
            raise BundleError(f"{origin}: public key {i} is not valid PEM ({exc})") from None
        if not isinstance(k, Ed25519PublicKey):
            raise BundleError(f"{origin}: public key {i} is a {type(k).__name__}; only ed25519 keys are trusted")
        keys[key_id(k)] = k
    return keys


def trusted_keys(trust: Path | None = None) -> tuple[dict[str, Ed25519PublicKey], str] | None:
    """The device's trusted keys and where they came from: `trust`, else $EDGEQA_TRUSTED_KEYS_FILE, else
    $EDGEQA_TRUSTED_KEYS (PEM text). None when the device names no trust anchor at all."""
    path = trust or (Path(os.environ[ENV_FILE]) if os.environ.get(ENV_FILE) else None)
    if path is not None:
        if not Path(path).is_file():
            raise BundleError(f"{path}: the trusted-keys file does not exist (from "
                              f"{'--trust' if trust else ENV_FILE})")
        return parse_trusted(Path(path).read_text(), str(path)), str(path)
    if os.environ.get(ENV_TEXT):
        return parse_trusted(os.environ[ENV_TEXT], f"${ENV_TEXT}"), f"${ENV_TEXT}"
    return None


def signature_record(manifest_bytes: bytes, key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"alg": "ed25519", "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}


def check_signature(folder: Path, keys: dict[str, Ed25519PublicKey], origin: str) -> str:
    """Raise BundleError naming what failed unless manifest.sig is a valid signature of manifest.json by one
    of `keys`; return the signing key's id."""
    folder = Path(folder)
    sig_file = folder / SIGNATURE
    if not sig_file.is_file():
        raise BundleError(f"{sig_file} is missing: the bundle is unsigned, and this device trusts only bundles "
                          f"signed by its trusted keys ({origin}); publish it through `edgeqa release`")
    try:
        rec = json.loads(sig_file.read_text())
        alg, kid, sig = rec["alg"], rec["key_id"], base64.b64decode(rec["signature"], validate=True)
    except (json.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
        raise BundleError(f"{sig_file}: unreadable ({exc!r}); expected JSON with alg, key_id and a base64 "
                          "signature") from None
    if alg != "ed25519":
        raise BundleError(f"{sig_file}: alg {alg!r}; only ed25519 signatures are accepted")
    if kid not in keys:
        raise BundleError(f"{sig_file}: signed by key {kid}, which is not among this device's trusted keys "
                          f"({origin}: {', '.join(sorted(keys))})")
    try:
        keys[kid].verify(sig, (folder / MANIFEST).read_bytes())
    except InvalidSignature:
        raise BundleError(f"{sig_file}: the signature does not match {folder / MANIFEST}: the manifest was "
                          "altered after signing") from None
    return str(kid)


def verify_trusted(folder: Path, trust: Path | None = None, require: bool = False) -> dict[str, Any]:
    """Files against the manifest (`bundle.verify`), then the manifest against the device's trusted keys.
    Without a trust anchor the signature is not checked (`require` turns that into a refusal); the returned
    manifest says which under `_trust`."""
    anchor = trusted_keys(trust)
    if anchor is None and require:
        raise BundleError(f"no trusted keys configured (--trust FILE, ${ENV_FILE} or ${ENV_TEXT}), and a signed "
                          "bundle is required")
    m = verify(folder)
    if anchor is None:
        m["_trust"] = {"checked": False}
        return m
    keys, origin = anchor
    m["_trust"] = {"checked": True, "key_id": check_signature(folder, keys, origin), "anchor": origin}
    return m
