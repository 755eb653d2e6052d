"""The edge bundle: one folder that the runtime loads, with a manifest that names and hashes every file.

    vision.onnx            pixels -> prefix embeddings (INT8 QDQ where it kept agreement, else FP32)
    decoder.onnx           embeddings + KV cache -> logits + new cache
    embeddings.safetensors the decoder's token embeddings over the pruned vocabulary
    tokenizer.json         a `tokenizers` tokenizer of the pruned vocabulary only (student ids, a few KB)
    runtime.json           layout token ids, schema, temperatures, operating threshold, image size
    manifest.json          format, runtime API, and the SHA-256 and size of every file above
    manifest.sig           (a released bundle) an ed25519 signature of manifest.json's exact bytes

`verify` refuses a bundle before anything is loaded: a missing, altered or unlisted file, a manifest of another
format, or a bundle built for another runtime API. Each message names the file or the key and says what was
expected. `edgeqa_runtime.trust` checks the signature against the device's own trusted keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeqa_runtime.files import sha256_file

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"  # signs the manifest, so it cannot be listed in it
FORMAT = "edgeqa-bundle"
FORMAT_VERSION = 1       # the layout of this folder and of manifest.json
RUNTIME_API = 1          # what runtime.json and the graphs' inputs/outputs mean; bumped on a breaking change
SUPPORTED_API = (1,)


class BundleError(RuntimeError):
    """A bundle the runtime refuses; the message names the file or the key and what was expected."""


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """SHA-256 and size of every file in the folder (relative POSIX paths), the manifest itself left out."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}


def write_manifest(folder: Path, **fields: Any) -> dict[str, Any]:
    """Hash every file of a finished bundle folder into manifest.json (written last). `fields` add
    bundle-level facts (source model, graph precision, metrics); they may not replace the reserved keys."""
    reserved = {"format", "format_version", "runtime_api", "files"}
    if reserved & fields.keys():
        raise ValueError(f"manifest fields {sorted(reserved & fields.keys())} are reserved")
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, "runtime_api": RUNTIME_API, **fields,
         "files": file_entries(folder)}
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    tmp.replace(Path(folder) / MANIFEST)
    return m


def read_manifest(folder: Path) -> dict[str, Any]:
    f = Path(folder) / MANIFEST
    if not f.is_file():
        raise BundleError(f"{f} is missing: {folder} is not an edge bundle (build one with the quantize stage)")
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{f} is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{f}: key 'format' is {m.get('format') if isinstance(m, dict) else m!r}; "
                          f"expected {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{f}: format_version {m.get('format_version')!r}; this runtime reads format_version "
                          f"{FORMAT_VERSION}: install the edgeqa-runtime that matches the bundle, or rebuild it")
    if m.get("runtime_api") not in SUPPORTED_API:
        raise BundleError(f"{f}: runtime_api {m.get('runtime_api')!r}; this runtime supports {list(SUPPORTED_API)}:"
                          " install the edgeqa-runtime that matches the bundle, or rebuild it")
    if not isinstance(m.get("files"), dict) or not m["files"]:
        raise BundleError(f"{f}: key 'files' must map each bundle file to its sha256 and bytes")
    return m


def verify(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest before anything is loaded; return the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a folder: point --bundle at an edge bundle folder")
    m = read_manifest(folder)
    listed = m["files"]
    for name, entry in sorted(listed.items()):
        p = folder / name
        if not p.is_file():
            raise BundleError(f"{p} is listed in {MANIFEST} but missing: the bundle is incomplete")
        if p.stat().st_size != entry.get("bytes") or sha256_file(p) != entry.get("sha256"):
            raise BundleError(f"{p} does not match its SHA-256 in {MANIFEST}: the file was altered or corrupted")
    present = {q.relative_to(folder).as_posix() for q in folder.rglob("*")
               if q.is_file() and q.relative_to(folder).as_posix() not in (MANIFEST, SIGNATURE)}
    extra = sorted(present - set(listed))
    if extra:
        raise BundleError(f"{folder / extra[0]} is not listed in {MANIFEST}: a bundle holds only the files its "
                          f"manifest names (unlisted: {extra})")
    return m
