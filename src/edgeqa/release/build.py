"""The release bundle: the gated edge bundle, plus an HTML model card, with lineage and a release version in
its manifest, signed with the release key.

Lineage is real or the build refuses:
- the working tree must equal a commit (HEAD, or an experiment saved with `dvc exp save`): params.yaml,
  dvc.lock and the code as run are committed, and the manifest names that commit;
- `dvc status` must be clean: every output in the workspace is the one dvc.lock records, so checking out the
  manifest's commit and running `dvc pull` gives back exactly these files.

The version is `<commit date>-<commit[:8]>-<bundle fingerprint[:8]>`: the same commit and bundle always give
the same version and the same manifest bytes (no build time inside), so releasing twice creates nothing new.
"""

from __future__ import annotations

import hashlib
import html
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from edgeqa.errors import StageError
from edgeqa.release.challenger import write_training_images
from edgeqa.release.signing import sign_copy
from edgeqa_runtime.bundle import MANIFEST, verify, write_manifest
from edgeqa_runtime.files import folder_fingerprint, sha256_file
from edgeqa_runtime.trust import key_id

CARD = "model_card.html"


class ReleaseError(StageError):
    """The release cannot be built; the message names the file, commit or stage and what to do."""


def _git(root: Path, *args: str) -> str:
    r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise ReleaseError(f"git {' '.join(args)} in {root} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def source_state(root: Path, commit: str = "HEAD") -> dict[str, str]:
    """The commit the working tree equals (tracked files), or a ReleaseError naming what differs."""
    sha = _git(root, "rev-parse", "--verify", f"{commit}^{{commit}}")
    # `dvc exp save` commits DVC's own run record (.dvc/tmp/repro.dat) and then removes it: not the project
    changed = [f for f in _git(root, "diff", "--name-only", sha, "--").splitlines()
               if f and not f.startswith(".dvc/tmp/")]
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ReleaseError(
            f"the working tree differs from {commit} ({sha[:12]}) in {shown}: a release names the exact commit it "
            "was built from. Commit params.yaml and dvc.lock as run (git commit), or save them with "
            "`dvc exp save` and release that experiment (--commit <its ref>)")
    return {"git_commit": sha, "git_ref": commit, "commit_date": _git(root, "show", "-s", "--format=%cs", sha)}


def dvc_clean(root: Path) -> None:
    """Every stage output in the workspace is the one dvc.lock records (`dvc status` is empty)."""
    r = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise ReleaseError(f"dvc status in {root} failed: {r.stderr.strip()[-500:]}")
    status = json.loads(r.stdout or "{}")
    if status:
        raise ReleaseError(f"dvc status is not clean (stages {', '.join(sorted(status))}): the workspace is not "
                           "what dvc.lock records. Run `dvc repro` (or `make run`), commit dvc.lock, then release")


def _outs(lock: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {name: {o["path"]: o.get("md5", "") for o in st.get("outs", [])}
            for name, st in lock.get("stages", {}).items()}


def _out_of(outs: dict[str, dict[str, str]], path: str) -> dict[str, str] | None:
    want = path.rstrip("/")
    for stage, paths in outs.items():
        if want in paths:
            return {"stage": stage, "path": want, "md5": paths[want]}
    return None


def lineage(root: Path, commit: str, ingest_dir: str, teacher_dir: str, bundle_dir: str,
            teacher_eval: dict[str, Any]) -> dict[str, Any]:
    """git commit, every dvc.lock stage's outputs (path -> DVC md5), params hash, dataset and teacher
    fingerprints, as recorded in the committed dvc.lock."""
    lock_file = Path(root) / "dvc.lock"
    if not lock_file.is_file():
        raise ReleaseError(f"{lock_file} is missing: run the pipeline (`make run`) before releasing")
    lock = yaml.safe_load(lock_file.read_text()) or {}
    outs = _outs(lock)
    facts = {"dataset": _out_of(outs, ingest_dir), "teacher": _out_of(outs, teacher_dir),
             "bundle": _out_of(outs, bundle_dir)}
    wanted = {"dataset": ingest_dir, "teacher": teacher_dir, "bundle": bundle_dir}
    for what, fact in facts.items():
        if fact is None:
            raise ReleaseError(f"{lock_file}: no stage output {wanted[what]!r} (the {what}); run the pipeline")
    return {"git_commit": commit, "dvc_lock_sha256": sha256_file(lock_file),
            "params_sha256": sha256_file(Path(root) / "params.yaml"),
            "dataset_fingerprint": facts["dataset"], "teacher_fingerprint": {
                **(facts["teacher"] or {}), "content": teacher_eval.get("fingerprint")},
            "bundle_out": facts["bundle"], "stages": outs}


def release_version(commit_date: str, commit: str, bundle_fp: str) -> str:
    return f"{commit_date.replace('-', '.')}-{commit[:8]}-{bundle_fp[:8]}"


# ----------------------------------------------------------------------------------------- the model card
_METRICS = (("auroc", "image AUROC"), ("verdict_accuracy", "verdict accuracy"), ("miss_rate", "miss rate"),
            ("overkill_rate", "overkill rate"), ("type_accuracy", "defect-type accuracy"),
            ("location_accuracy", "location accuracy"), ("parse_rate", "parse rate"),
            ("reason_names_type", "reason names the type"))


def _f(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _bars(evals: dict[str, dict[str, Any]]) -> str:
    """An inline SVG bar chart: AUROC and type accuracy of the candidate, the teacher and the baseline."""
    w, bar, gap = 460, 16, 6
    rows = [(f"{role} {label}", e.get(key)) for key, label in (("auroc", "AUROC"), ("type_accuracy", "type acc."))
            for role, e in evals.items()]
    h = len(rows) * (bar + gap) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             'aria-label="AUROC and type accuracy">']
    for i, (label, v) in enumerate(rows):
        y = 5 + i * (bar + gap)
        length = 0 if v is None else max(0.0, min(1.0, float(v))) * 250
        parts.append(f'<text x="0" y="{y + 12}" font-size="11">{html.escape(label)}</text>'
                     f'<rect x="170" y="{y}" width="{length:.1f}" height="{bar}" fill="#4a78a8"/>'
                     f'<text x="{175 + length:.1f}" y="{y + 12}" font-size="11">{_f(v)}</text>')
    return "".join(parts) + "</svg>"


def model_card(m: dict[str, Any], evals: dict[str, dict[str, Any]], gate: dict[str, Any],
               ingest: dict[str, Any] | None) -> str:
    """The HTML model card: intended use, data, metrics, a plot, the gate, limits and lineage."""
    c, lin = evals["candidate"], m["lineage"]
    rows = "".join(f"<tr><td>{label}</td>" + "".join(f"<td>{_f(e.get(k))}</td>" for e in evals.values()) + "</tr>"
                   for k, label in _METRICS)
    rules = "".join(
        f"<tr><td>{html.escape(r['rule'])}</td><td>{'see report' if isinstance(r['value'], dict) else _f(r['value'])}"
        f"</td><td>{html.escape(r['op'])} {_f(r['threshold'])}</td><td>{html.escape(r['source'])}</td>"
        f"<td>{'pass' if r['passed'] else 'FAIL'}</td></tr>" for r in gate["rules"])
    signer = html.escape(str(m.get("signed_by", "")))
    limits = [f"Defect-type accuracy is {_f(c.get('type_accuracy'))} and location accuracy "
              f"{_f(c.get('location_accuracy'))} on {c.get('split')}: use the verdict for sorting and treat the "
              "type and location as hints for the human who checks the part.",
              f"Miss rate {_f(c.get('miss_rate'))} and overkill rate {_f(c.get('overkill_rate'))} hold at the "
              f"shipped threshold {_f(m.get('threshold'))} on {c.get('images')} images only; a new product, camera "
              "or lighting needs its own evaluation.",
              "Latency depends on the device's CPU: measure it there (`make bench`), not from this card."]
    if m.get("source") == "baseline":
        limits.insert(0, "This bundle was compressed from the baseline student (human labels only): it carries "
                         "none of the teacher's knowledge.")
    if gate.get("overrides"):
        limits.append(f"The gate passed with explicit overrides ({', '.join(gate['overrides'])}): "
                      f"{html.escape(str(gate.get('override_reason')))}")
    data = ""
    if ingest:
        data = "".join(f"<li>{html.escape(str(k))}: {_f(v)}</li>" for k, v in ingest.items()
                       if isinstance(v, int | float | str) and not isinstance(v, bool))
    heads = "".join(f"<th>{html.escape(r)}</th>" for r in evals)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeqa model card {html.escape(m['version'])}</title>
<style>body{{font-family:sans-serif;max-width:56em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:.2em .6em}}</style></head><body>
<h1>edgeqa defect inspector {html.escape(m['version'])}</h1>
<h2>Intended use</h2>
<p>Visual inspection of product photos on an edge device: answer "good" or "defective", with the defect type,
its location and a one-sentence reason, for a quality engineer to confirm. It is a screening aid, not a
sole safety decision. Run it with the torch-free runtime: <code>edgeqa-edge predict --bundle DIR IMAGE
--trust KEYS</code>, on a device that trusts the release key (signature key id <code>{signer}</code>).</p>
<h2>Model</h2>
<ul><li>compressed from the <code>{html.escape(str(m.get('source')))}</code> student; graphs
{html.escape(json.dumps(m.get('graphs')))}</li><li>{_f(m['bytes'] / 1e6)} MB, shipped threshold
{_f(m.get('threshold'))}</li><li>candidate bundle {html.escape(str(m.get('candidate_version')))}</li></ul>
<h2>Data</h2>
<p>Scored on the <code>{html.escape(str(c.get('split')))}</code> split: {_f(c.get('images'))} images,
{_f(c.get('defective'))} defective. Dataset fingerprint (DVC) <code>{html.escape(lin['dataset_fingerprint']['md5'])}
</code>.</p><ul>{data}</ul>
<h2>Metrics (through the edge runtime, beside the teacher and the baseline student)</h2>
<table><tr><th>metric</th>{heads}</tr>{rows}</table>
<p>{_bars(evals)}</p>
<h2>Release gate: {'passed' if gate['passed'] else 'REFUSED'}</h2>
<p>{html.escape(gate['summary'])}</p>
<table><tr><th>rule</th><th>value</th><th>allowed</th><th>threshold from</th><th>result</th></tr>{rules}</table>
<h2>Limits</h2><ul>{''.join(f'<li>{x}</li>' for x in limits)}</ul>
<h2>Lineage</h2>
<ul><li>git commit <code>{lin['git_commit']}</code></li><li>params.yaml sha256 <code>{lin['params_sha256']}</code></li>
<li>dvc.lock sha256 <code>{lin['dvc_lock_sha256']}</code></li>
<li>teacher (DVC) <code>{html.escape(str(lin['teacher_fingerprint'].get('md5')))}</code></li></ul>
<p>To get these files back: <code>git checkout {lin['git_commit'][:12]} &amp;&amp; dvc pull</code>.</p>
</body></html>
"""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ReleaseError(f"{path} is missing: {what} (run the pipeline: `make run` or `dvc repro`)")
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(out, dict):
        raise ReleaseError(f"{path}: expected a JSON object")
    return out


def build(root: Path, params: Any, out: Path, key: Any, commit: str = "HEAD",
          check_dvc: bool = True) -> dict[str, Any]:
    """Build the signed release bundle into the new folder `out` (temp folder, then rename). Returns its
    manifest. Refuses a dirty tree, a workspace that is not what dvc.lock records, or a damaged bundle."""
    root, out = Path(root).resolve(), Path(out)
    if out.exists():
        raise ReleaseError(f"{out} already exists: a release is built into a new folder")
    state = source_state(root, commit)
    if check_dvc:
        dvc_clean(root)
    paths, cand = params.paths, params.gate.candidate
    bundle = root / paths.models_dir / cand
    cm = verify(bundle)
    reports = root / paths.reports_dir
    gate = _read_json(reports / "gate" / "report.json", "the gate stage's report")
    if gate.get("bundle", {}).get("fingerprint") != folder_fingerprint(bundle):
        raise ReleaseError(f"{reports / 'gate' / 'report.json'} gated another bundle than {bundle}: rerun the "
                           "gate stage (dvc repro gate)")
    evals = {role: _read_json(reports / "evaluate" / name / "metrics.json", f"evaluate@{name}")
             for role, name in (("candidate", cand), ("teacher", "teacher"), ("baseline", "baseline"))}
    ingest = reports / "ingest" / "metrics.json"
    lin = lineage(root, state["git_commit"], paths.ingest_dir, f"{paths.models_dir}/teacher",
                  f"{paths.models_dir}/{cand}", evals["teacher"])
    fp = folder_fingerprint(bundle)
    fields = {k: v for k, v in cm.items() if k not in ("format", "format_version", "runtime_api", "files")}
    fields.update(version=release_version(state["commit_date"], state["git_commit"], fp), candidate_version=cm.get(
        "version"), lineage=lin, git_ref=state["git_ref"], bytes=sum(e["bytes"] for e in cm["files"].values()),
        signed_by=key_id(key.public_key()),
        gate={"passed": gate["passed"], "summary": gate["summary"],
              "report_sha256": sha256_file(reports / "gate" / "report.json"), "overrides": gate.get("overrides")},
        metrics={k: evals["candidate"].get(k) for k, _ in _METRICS} | {"split": evals["candidate"].get("split"),
                                                                         "images": evals["candidate"].get("images")})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.unsigned.", dir=out.parent))
    try:  # the unsigned release in a temp folder, then a signed copy at `out` (itself written temp-then-rename)
        for name in cm["files"]:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle / name, tmp / name)
        card = model_card({**fields, "threshold": fields.get("threshold", gate["bundle"].get("threshold"))},
                          evals, gate, json.loads(ingest.read_text()) if ingest.is_file() else None)
        (tmp / CARD).write_text(card)
        # the images outside the evaluation split, by hash: champion/challenger leaves them out of its comparison
        write_training_images(tmp, root / paths.ingest_dir / "manifest.parquet", params.evaluate.split)
        m = write_manifest(tmp, **fields)
        sign_copy(tmp, out, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify(out)
    return m


def manifest_sha256(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()
