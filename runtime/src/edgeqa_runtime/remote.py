"""Bundles straight from the release registry on S3 (the `[s3]` extra: boto3).

`--bundle s3://BUCKET/production` (or `staging`, `candidates/<version>`, or `<version>`) resolves the alias
to a version, downloads that version into the local cache, verifies every file's SHA-256 against the
manifest, and answers with it. The cache holds one folder per version (`$EDGEQA_BUNDLE_CACHE`, default
`~/.cache/edgeqa/bundles/<bucket>/<version>`); a cached copy is verified again on every use and downloaded
again when damaged. A download lands in a temp folder and is renamed last, so a killed download leaves no
half bundle. The signature is checked by the caller against the device's own trusted keys, as for a folder.

Endpoint and credentials are boto3's own settings: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, and
`AWS_ENDPOINT_URL_S3` for an S3-compatible store such as SeaweedFS or MinIO.

The registry layout read here is written by `edgeqa.release.registry`: `candidates/<version>/...` with the
manifest last, and `aliases/<alias>.json` whose `to` names the version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from edgeqa_runtime.bundle import MANIFEST, SIGNATURE, BundleError, verify

ALIASES = ("staging", "production")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def is_remote(bundle: str | os.PathLike[str]) -> bool:
    return str(bundle).startswith("s3://")


def parse(url: str) -> tuple[str, str]:
    """`s3://bucket/ref` -> (bucket, ref); ref is an alias, `candidates/<version>` or `<version>`."""
    rest = url[len("s3://"):].strip("/")
    bucket, _, ref = rest.partition("/")
    if not bucket or not ref:
        raise BundleError(f"{url}: expected s3://BUCKET/production, s3://BUCKET/staging or "
                          "s3://BUCKET/candidates/<version>")
    return bucket, ref


def default_cache() -> Path:
    if os.environ.get("EDGEQA_BUNDLE_CACHE"):
        return Path(os.environ["EDGEQA_BUNDLE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeqa" / "bundles"


def client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise BundleError("an s3:// bundle needs boto3: pip install 'edgeqa-runtime[s3]'") from None
    return boto3.client("s3", config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}))


def _get(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404"):
            return None
        if code in ("NoSuchBucket",):
            raise BundleError(f"s3://{bucket}: no such bucket") from None
        raise BundleError(f"s3://{bucket}/{key}: {exc}") from None


def resolve(s3: Any, bucket: str, ref: str) -> str:
    """The version an alias points at (or the version named)."""
    if ref in ALIASES:
        raw = _get(s3, bucket, f"aliases/{ref}.json")
        if raw is None:
            raise BundleError(f"s3://{bucket}/{ref}: the alias is not set (nothing was promoted to {ref} yet)")
        version = str(json.loads(raw)["to"])
    else:
        version = ref.removeprefix("candidates/").strip("/")
    if not _VERSION.match(version):
        raise BundleError(f"s3://{bucket}/{ref}: {version!r} is not a version name (letters, digits, . _ -); "
                          f"the aliases are {', '.join(ALIASES)}")
    return version


def fetch(url: str, cache: Path | None = None, s3: Any = None) -> Path:
    """The verified local folder of the bundle at `url` (downloaded once per version)."""
    bucket, ref = parse(url)
    s3 = s3 or client()
    version = resolve(s3, bucket, ref)
    dest = Path(cache or default_cache()) / bucket / version
    if dest.is_dir():
        try:
            verify(dest)
            return dest
        except BundleError:
            shutil.rmtree(dest)  # damaged since it was cached: fetch it again
    raw = _get(s3, bucket, f"candidates/{version}/{MANIFEST}")
    if raw is None:
        raise BundleError(f"s3://{bucket}/candidates/{version}/: no such version (a version without its "
                          "manifest is incomplete and does not exist)")
    try:
        files = list(json.loads(raw)["files"])
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"s3://{bucket}/candidates/{version}/{MANIFEST}: not a bundle manifest") from None
    for name in files:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts:
            raise BundleError(f"s3://{bucket}/candidates/{version}/{MANIFEST}: file name {name!r} leaves the bundle")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
    try:
        for name in [*files, SIGNATURE]:
            data = _get(s3, bucket, f"candidates/{version}/{name}")
            if data is None:
                if name == SIGNATURE:
                    continue  # the device's trust settings decide whether an unsigned bundle is acceptable
                raise BundleError(f"s3://{bucket}/candidates/{version}/{name} is missing")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_bytes(raw)
        verify(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another process cached the same version meanwhile
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
