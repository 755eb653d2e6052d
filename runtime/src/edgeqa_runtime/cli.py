"""`edgeqa-edge predict --bundle DIR|s3://BUCKET/ALIAS IMAGE_OR_FOLDER [--out FILE.jsonl]`: the device-side command.

One JSON object per image: path, verdict, type, location, reason, P(defective), the type and location
distributions and the latency (file read to answer, decoding and the reason included). A folder is walked
recursively (image extensions only, sorted) with a progress bar on stderr. An image that does not decode gets
its own line with `error` and the rest are still answered. The bundle is verified (every file's SHA-256)
before anything is loaded, and its signature against the device's trusted keys (`--trust FILE`,
$EDGEQA_TRUSTED_KEYS_FILE or $EDGEQA_TRUSTED_KEYS; see `edgeqa_runtime.trust`). Without a trust anchor the
signature is not checked and a warning says so; `--require-signature` refuses instead.

Exit status: 0 every image answered; 1 some images could not be read (each named in the output);
2 the bundle or the arguments were refused (the message names the file).
`edgeqa predict` in a full install takes the same arguments and calls `predict` here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from edgeqa_runtime.bundle import BundleError
from edgeqa_runtime.remote import is_remote

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def images_in(target: Path) -> list[Path]:
    """The image files to answer: the file itself, or every image under a folder (sorted, recursive)."""
    if target.is_file():
        return [target]
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    raise FileNotFoundError(f"{target}: no such image or folder")


def record(path: Path, pred: dict[str, Any], bundle_id: str) -> dict[str, Any]:
    a = pred["answer"]
    return {"path": str(path), "verdict": a["verdict"], "type": a["defect_type"], "location": a["location"],
            "reason": a["reason"], "p_defective": round(pred["p_defective"], 6),
            "type_probs": {k: round(v, 6) for k, v in pred["type_probs"].items()},
            "location_probs": {k: round(v, 6) for k, v in pred["location_probs"].items()},
            "latency_ms": pred["latency_ms"], "bundle": bundle_id}


def answers(bundle: Path, paths: list[Path], threads: int = 1, max_reason_tokens: int | None = None,
            progress: bool = True, trust: Path | None = None, require_signature: bool = False,
            embedding: bool = False) -> Iterator[dict[str, Any]]:
    """One output record per path, in order; an image that cannot be read yields {"path", "error"}. With
    `embedding`, each record also carries the model's mean image token (for the prediction log)."""
    from tqdm import tqdm

    from edgeqa_runtime.session import ImageReadError, OrtStudent
    from edgeqa_runtime.trust import verify_trusted

    checked = verify_trusted(bundle, trust, require_signature)["_trust"]
    if not checked["checked"]:
        print(f"edgeqa-edge: warning: the signature of {bundle} was NOT checked: no trusted keys configured "
              "(--trust FILE, $EDGEQA_TRUSTED_KEYS_FILE or $EDGEQA_TRUSTED_KEYS)", file=sys.stderr)
    model = OrtStudent(bundle, threads)
    n_tokens = int(max_reason_tokens or model.rt.get("max_reason_tokens", 40))
    bundle_id = model.manifest.get("version") or model.fingerprint
    for p in tqdm(paths, desc="predict", unit="img", disable=not progress or len(paths) < 2, file=sys.stderr):
        try:  # only reading and decoding the file is the image's fault; a model error propagates
            pred = model.predict_file(p, n_tokens)
        except ImageReadError as exc:
            yield {"path": str(p), "error": str(exc)}
            continue
        rec = record(p, pred, bundle_id)
        if embedding:  # a second pass of the vision graph only: the answer's own pass keeps no state
            from edgeqa_runtime.preprocess import pixels

            rec["embedding"] = model.embed(pixels([p], int(model.rt["image_size"])))[0]
        yield rec


def predict(bundle: str | Path, target: Path, out: Path | None = None, threads: int = 1,
            max_reason_tokens: int | None = None, progress: bool = True, stdout: TextIO | None = None,
            trust: Path | None = None, require_signature: bool = False, log: Path | None = None) -> int:
    """Answer an image or a folder with a bundle; JSON lines to `out` (written to a temp name, then renamed)
    or to stdout. Returns the exit status (0 all answered, 1 some images unreadable). `bundle` may be
    `s3://BUCKET/production` (or staging, or a version): see `edgeqa_runtime.remote`. With `log`, each answer
    is also appended to that prediction log (`edgeqa_runtime.predlog`)."""
    if is_remote(bundle):
        from edgeqa_runtime.remote import fetch

        bundle = fetch(str(bundle))
    paths = images_in(Path(target))
    if not paths:
        raise FileNotFoundError(f"{target}: no images (extensions {', '.join(IMAGE_EXTS)})")
    failed = 0

    def write_all(sink: TextIO) -> None:
        nonlocal failed
        from edgeqa_runtime.predlog import Appender, entry

        appender = Appender(log) if log is not None else None
        try:
            for rec in answers(Path(bundle), paths, threads, max_reason_tokens, progress, trust,
                               require_signature, embedding=appender is not None):
                failed += "error" in rec
                emb = rec.pop("embedding", None)  # the log's, not the answer's
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
                if appender is not None and "error" not in rec:
                    appender.write(entry(Path(rec["path"]), rec, emb))
        finally:
            if appender is not None:
                appender.close()

    if out is None:
        write_all(stdout or sys.stdout)
    else:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                write_all(f)
            os.replace(tmp, out)  # published only when every image has its line
        finally:
            tmp.unlink(missing_ok=True)
    if failed:
        print(f"{failed} of {len(paths)} images could not be read (see their 'error' lines)", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="edgeqa-edge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="answer an image or every image in a folder with an edge bundle")
    p.add_argument("--bundle", required=True, help="the edge bundle folder, or s3://BUCKET/production (or "
                   "staging, or candidates/<version>; needs the [s3] extra; downloaded once, verified every time)")
    p.add_argument("target", type=Path, metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", type=Path, help="write JSON lines here (default: stdout)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--max-reason-tokens", type=int, help="cap on the reason (default: the bundle's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--trust", type=Path, help="this device's trusted public keys (PEM); default: "
                   "$EDGEQA_TRUSTED_KEYS_FILE, then $EDGEQA_TRUSTED_KEYS")
    p.add_argument("--require-signature", action="store_true",
                   help="refuse the bundle when no trusted keys are configured")
    p.add_argument("--log", type=Path, help="also append each answer to this prediction log (JSON lines: image "
                   "hash, answer, P(defective), bundle version), for `edgeqa feedback push`")
    a = ap.parse_args(argv)
    try:
        code = predict(a.bundle, a.target, a.out, a.threads, a.max_reason_tokens, not a.no_progress,
                       trust=a.trust, require_signature=a.require_signature, log=a.log)
    except (BundleError, FileNotFoundError) as exc:
        print(f"edgeqa-edge: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
