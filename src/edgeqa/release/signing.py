"""The release signing key and signed copies of a bundle.

The key (ed25519, PEM, PKCS#8) comes from, in order:
1. `$EDGEQA_SIGNING_KEY`: the PEM text itself (a CI or worker secret);
2. the file `$EDGEQA_SIGNING_KEY_FILE`, else `~/.config/edgeqa/release-signing-key.pem`: created at first use
   with mode 600 in a folder of mode 700, outside any git tree; a file that group or others can read is
   refused, as ssh refuses such a key.

Devices never get this key: they get its public half (`edgeqa keys public`) in their own trust config
(`edgeqa_runtime.trust`). A bundle is signed on a copy (`sign_copy`), never in `models/edge`, which is a DVC
output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text
from edgeqa_runtime.bundle import MANIFEST, SIGNATURE, verify
from edgeqa_runtime.trust import key_id, signature_record

log = logging.getLogger("edgeqa.release")
ENV_KEY, ENV_KEY_FILE = "EDGEQA_SIGNING_KEY", "EDGEQA_SIGNING_KEY_FILE"


def default_key_file() -> Path:
    if os.environ.get(ENV_KEY_FILE):
        return Path(os.environ[ENV_KEY_FILE])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edgeqa" / "release-signing-key.pem"


def _parse(pem: bytes, origin: str) -> Ed25519PrivateKey:
    try:
        k = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise StageError(f"{origin}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(k, Ed25519PrivateKey):
        raise StageError(f"{origin}: a {type(k).__name__}; the release signing key must be ed25519")
    return k


def _create(path: Path, what: str = "release signing key") -> Ed25519PrivateKey:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(prefix=".signing-key.", dir=path.parent)  # mkstemp creates it with mode 600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if another process created the key meanwhile: never overwrite a key
    except FileExistsError:
        return _parse(path.read_bytes(), str(path))
    finally:
        os.unlink(tmp)
    log.warning("created a new %s %s (key id %s)%s", what, path, key_id(key.public_key()),
                "; give devices its public key: edgeqa keys public" if what == "release signing key" else "")
    return key


def load_or_create(path: Path | None = None, what: str = "release signing key") -> tuple[Ed25519PrivateKey, str]:
    """The signing key and where it came from (see the module doc for the order). `what` names another kind
    of key kept the same way (a reviewer's key, given its path)."""
    if path is None and os.environ.get(ENV_KEY):
        return _parse(os.environ[ENV_KEY].encode(), f"${ENV_KEY}"), f"${ENV_KEY}"
    path = Path(path) if path is not None else default_key_file()
    if not path.exists():
        return _create(path, what), str(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise StageError(f"{path}: permissions {mode:04o} are too open for a signing key; it must be readable by "
                         f"its owner only (chmod 600 {path})")
    return _parse(path.read_bytes(), str(path)), str(path)


def from_secret(name: str) -> tuple[Ed25519PrivateKey, str]:
    """The signing key kept (PEM) in the Prefect Secret block `name`: how a worker gets it without a file."""
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(name)
        pem = str(block.get())
    except ValueError:
        raise StageError(f"no Prefect Secret block {name!r} with the signing key; `edgeqa release` stores "
                         f"${ENV_KEY} there, or pass --key-file") from None
    return _parse(pem.encode(), f"Prefect Secret {name}"), f"Prefect Secret {name}"


def sign_copy(bundle: Path, dest: Path, key: Ed25519PrivateKey) -> dict[str, str]:
    """Copy a verified bundle to `dest` (a new folder), sign its manifest there; `dest` appears complete or
    not at all. Returns the signature record."""
    bundle, dest = Path(bundle), Path(dest)
    verify(bundle)
    if dest.exists():
        raise StageError(f"{dest} already exists: a signed copy is written to a new folder only")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shutil.copytree(bundle, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(SIGNATURE))
        verify(tmp)
        rec = signature_record((tmp / MANIFEST).read_bytes(), key)
        atomic_write_text(tmp / SIGNATURE, json.dumps(rec, indent=1) + "\n")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rec
