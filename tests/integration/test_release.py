"""`edgeqa release` (the `edgeqa-release` flow on the session's Prefect server) on a copy of the tiny
pipeline's repo, with its own registry bucket on the session's SeaweedFS: the gate's refusal (exit 3, nothing
published), a dirty tree refused, then with explicit gate overrides committed: the signed release bundle with
its model card and lineage reaches `staging` ("no champion"), a second release creates nothing, the manifest's
commit + `dvc pull` give back the bundle's files with the recorded hashes, and a device answers with the
bundle straight from S3. Then champion/challenger against a real champion."""

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeqa.release.challenger import TRAINING_IMAGES
from edgeqa.release.registry import Registry
from edgeqa_runtime.bundle import MANIFEST, verify
from edgeqa_runtime.files import sha256_file
from edgeqa_runtime.trust import key_id, public_pem, verify_trusted

from ..conftest import dvc
from .conftest import KEY

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GIT = ["git", "-c", "user.email=test@example.invalid", "-c", "user.name=release-test"]
REVIEWER = Ed25519PrivateKey.generate()
LOOSE = {"min_auroc": 0.0, "min_type_accuracy": 0.0, "min_parse_rate": 0.0, "max_miss_rate": 1.0,
         "max_overkill_rate": 1.0, "max_bundle_mb": 1000.0, "max_auroc_drop_vs_teacher": 1.0,
         "max_auroc_drop_vs_baseline": 1.0, "max_type_accuracy_drop_vs_baseline": 1.0}


def _artifacts(run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def make_releasable(repo):
    """The tiny models fail the policy: explicit gate overrides with their reason, and qe.alice on the
    reviewers' allow-list; then `dvc repro gate`. Not committed."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gate"]["overrides"] = LOOSE
    params["gate"]["override_reason"] = "tiny test models"
    params["release"]["reviewers"] = [{"name": "qe.alice", "role": "quality engineer",
                                       "public_key": public_pem(REVIEWER.public_key())}]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dvc(repo, "repro", "gate")


def _git(repo, *args):
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def test_release_refused_by_the_gate_then_released_with_recorded_overrides(tiny_repo, stack, cli, tmp_path,
                                                                           monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, symlinks=True)
    reg = Registry(stack.s3_client(), os.environ["EDGEQA_RELEASES_BUCKET"])
    before = reg.versions()
    gate = json.loads((repo / "reports" / "gate" / "report.json").read_text())
    if not gate["passed"]:  # the tiny models fail the policy: a refusal is exit 3 and publishes nothing
        out = cli(repo, "release", code=3)
        assert "release refused by the gate" in out and gate["summary"][:40] in out.replace("\n", "")
        assert reg.versions() == before

    # explicit overrides, with their reason, as a profile would set them; only the gate stage reruns
    r = make_releasable(repo)
    assert "Running stage 'evaluate" not in r.stdout, "only the gate reruns for a gate override"
    assert json.loads((repo / "reports" / "gate" / "report.json").read_text())["passed"]

    out = cli(repo, "release", code=2)  # params.yaml and dvc.lock as run are not committed yet
    assert "the working tree differs from HEAD" in out and "dvc.lock" in out.replace("\n", "")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "the run to release")
    commit = _git(repo, "rev-parse", "HEAD")

    out = cli(repo, "release", "--reason", "first tiny release")  # runs on the worker; it waits for a reviewer
    version = out.split("staged: ")[1].split()[0]
    assert "champion/challenger: no champion" in out and "waits for a reviewer" in out
    assert f"edgeqa approve {version}" in out and "edgeqa approval-token" in out
    ptr, _ = reg.pointer("staging")
    assert ptr["to"] == version and ptr["reason"] == "first tiny release"
    assert version.split("-")[1] == commit[:8]

    # the published release: signed by the release key, a model card, gate and lineage in the manifest
    dl = reg.download(version, tmp_path / "dl")
    trust = tmp_path / "trusted.pem"
    trust.write_text(public_pem(KEY.public_key()))
    assert verify_trusted(dl, trust, require=True)["_trust"]["key_id"] == key_id(KEY.public_key())
    m = json.loads((dl / MANIFEST).read_text())
    card = (dl / "model_card.html").read_text()
    assert version in card and "Intended use" in card and "Limits" in card and "<svg" in card
    assert m["gate"]["passed"] and set(m["gate"]["overrides"]) == set(LOOSE), "the overrides are recorded"
    assert m["gate"]["report_sha256"] == sha256_file(repo / "reports" / "gate" / "report.json")
    assert ptr["gate_report_sha256"] == m["gate"]["report_sha256"]
    lin = m["lineage"]
    assert lin["git_commit"] == commit
    assert lin["params_sha256"] == sha256_file(repo / "params.yaml")
    assert lin["dvc_lock_sha256"] == sha256_file(repo / "dvc.lock")
    assert lin["dataset_fingerprint"]["stage"] == "ingest" and lin["teacher_fingerprint"]["stage"] == "teacher_sft"
    assert lin["bundle_out"]["stage"] == "quantize"

    # releasing the same commit again: the same version, no new audit event, no approval request
    n = len(reg.audit("staging"))
    assert "nothing new" in cli(repo, "release")
    assert len(reg.audit("staging")) == n

    # lineage is real: the manifest's commit + dvc pull give back the bundle with the recorded hashes
    dvc(repo, "push")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    _git(clone, "checkout", "-q", lin["git_commit"])
    stack.configure_dvc(clone)
    dvc(clone, "pull", lin["bundle_out"]["path"])
    pulled = clone / lin["bundle_out"]["path"]
    verify(pulled)
    for name, entry in m["files"].items():
        if name not in ("model_card.html", TRAINING_IMAGES):  # written by the release, not by a stage
            assert sha256_file(pulled / name) == entry["sha256"], name

    # a device answers with the staging bundle straight from S3: downloaded once, verified, cached
    for k, v in stack.s3_env().items():
        monkeypatch.setenv(k, v)
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEQA_BUNDLE_CACHE", str(cache))
    image = sorted((repo / "data").rglob("*.png"))[0]
    url = f"s3://{reg.bucket}/staging"

    def edge(*args):
        return subprocess.run([sys.executable, "-m", "edgeqa_runtime.cli", "predict", "--no-progress", *args],
                              capture_output=True, text=True, env=os.environ)

    r = edge("--bundle", url, str(image), "--trust", str(trust), "--require-signature")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.splitlines()[0])
    assert rec["bundle"] == version and rec["verdict"] in ("good", "defective")
    cached = cache / reg.bucket / version
    assert (cached / "model_card.html").is_file()
    damaged = next(n for n in m["files"] if n != "model_card.html")
    (cached / damaged).write_bytes(b"damaged")  # a cached copy damaged on the device is fetched again
    r = edge("--bundle", url, str(image), "--trust", str(trust))
    assert r.returncode == 0, r.stderr
    assert sha256_file(cached / damaged) == m["files"][damaged]["sha256"]
    other = tmp_path / "other.pem"  # a device that trusts another key refuses the same bundle
    other.write_text(public_pem(Ed25519PrivateKey.generate().public_key()))
    r = edge("--bundle", url, str(image), "--trust", str(other))
    assert r.returncode == 2 and "which is not among this device's trusted keys" in r.stderr, r.stderr
    r = edge("--bundle", f"s3://{reg.bucket}/candidates/no-such-version", str(image))
    assert r.returncode == 2 and "no-such-version/: no such version" in r.stderr, r.stderr
    # `edgeqa predict` takes the same s3:// bundle
    out = cli(repo, "predict", "--bundle", url, str(image), "--trust", str(trust), "--no-progress")
    assert json.loads([line for line in out.splitlines() if line.startswith("{")][-1])["bundle"] == version

    # champion/challenger against a real champion: this release goes to production, then candidates meet it
    from edgeqa.config import ChallengerRules, load_params
    from edgeqa.release.challenger import compare
    from edgeqa_runtime.bundle import write_manifest

    rkey = tmp_path / "alice.pem"
    rkey.write_bytes(REVIEWER.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    rkey.chmod(0o600)
    stranger = tmp_path / "mallory.pem"
    stranger.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    stranger.chmod(0o600)
    assert "is not on the allow-list release.reviewers" in cli(repo, "approve", version, "--key", str(stranger),
                                                              code=2)
    assert "not on staging" in cli(repo, "approve", "2000.01.01-deadbeef-00000000", "--key", str(rkey), code=2)
    out = cli(repo, "approve", version, "--key", str(rkey), "--comment", "looked at the card")  # resumes the run
    assert f"released: {version}: approve by qe.alice (quality engineer)" in out
    assert f"production: (none) -> {version}" in out
    assert "already decided" in cli(repo, "approve", version, "--key", str(rkey), code=2)
    assert len(reg.audit("staging")) == n, "the resumed run repeated none of what it did before it waited"
    ev = reg.audit("production")[-1]
    assert ev["action"] == "approve" and ev["who"] == "qe.alice (quality engineer)"
    from edgeqa.config import load_params as _lp
    from edgeqa.release.approval import verify_decision
    assert verify_decision(ev["approval"], _lp(repo / "params.yaml").release.reviewers).name == "qe.alice"
    assert ev["approval"]["decision"]["staging_seq"] == ptr["seq"], "bound to the staging event it answers"
    assert "nothing new" in cli(repo, "release"), "a candidate equal to production creates no request either"

    # a second release, decided in the Prefect form with a one-time token (what the UI's Resume form sends)
    from prefect.client.orchestration import get_client
    from prefect.flow_runs import resume_flow_run

    _git(repo, "commit", "-q", "--allow-empty", "-m", "a second release of the same run")
    out = cli(repo, "release", "--reason", "second")
    v2 = out.split("staged: ")[1].split()[0]
    assert v2 != version and f"champion/challenger: the candidate holds against champion {version}" in out
    st2, _ = reg.pointer("staging")
    run_id = st2["flow_run_id"]

    def token():
        t = cli(repo, "approval-token", v2, "--key", str(rkey))
        return next(line.split("token: ")[1] for line in t.splitlines() if line.startswith("token: "))

    def resume(**given):
        resume_flow_run(run_id, run_input={"decision": "approve", "reviewer": "qe.alice", **given})
        with get_client(sync_client=True) as client:
            for _ in range(240):
                time.sleep(1)
                fr = client.read_flow_run(run_id)
                if fr.state.is_paused() or fr.state.is_final():
                    return fr
        raise AssertionError(f"run {run_id} still {fr.state.name}")

    t1 = token()
    fr = resume(token=t1 + "-guessed", comment="a wrong token")
    assert fr.state.is_paused(), "a wrong token is refused and the run waits again"
    refusals = reg.s3.list_objects_v2(Bucket=reg.bucket, Prefix=f"refusals/{v2}/").get("Contents", [])
    assert len(refusals) == 1
    kept = json.loads(reg.s3.get_object(Bucket=reg.bucket, Key=refusals[0]["Key"])["Body"].read())
    assert "is wrong" in kept["why"] and "token" not in kept["input"], "the refusal is kept, the typed token is not"
    fr = resume(token=t1, comment="the right token, burnt by the guess")
    assert fr.state.is_paused(), "a token works once: the wrong guess consumed it"
    fr = resume(token=token(), comment="numbers match the card")
    assert fr.state.is_completed()
    res = fr.state.result()
    assert res["outcome"] == "released" and res["decision"]["reviewer"] == "qe.alice"
    ev = reg.audit("production")[-1]
    assert (ev["from"], ev["to"], ev["action"]) == (version, v2, "approve")
    assert ev["approval"]["decision"]["via"] == "prefect-ui-token" and ev["reason"] == "numbers match the card"
    assert verify_decision(ev["approval"], _lp(repo / "params.yaml").release.reviewers).name == "qe.alice"
    assert "release-decision" in {a.key for a in _artifacts(run_id)}
    shown = json.JSONDecoder().raw_decode(cli(repo, "releases", "show", v2))[0]  # stdout first
    assert [(d["decision"], d["reviewer"], d["via"]) for d in shown["decisions"]] == [
        ("approve", "qe.alice", "prefect-ui-token")]
    assert len(shown["refused_decisions"]) == 2 and all(r["reviewer"] == "qe.alice"
                                                         for r in shown["refused_decisions"])

    # rollback: production is the first bundle again, byte for byte, and a device answers as it did
    prod_url = f"s3://{reg.bucket}/production"
    r = edge("--bundle", prod_url, str(image), "--trust", str(trust))
    assert json.loads(r.stdout.splitlines()[0])["bundle"] == v2
    out = cli(repo, "rollback", "--reason", "test")
    assert f"{v2} -> {version}" in out
    back = reg.download(version, tmp_path / "back")
    for name in m["files"]:
        assert (back / name).read_bytes() == (dl / name).read_bytes(), name
    from_s3 = edge("--bundle", prod_url, str(image), "--trust", str(trust))
    local = edge("--bundle", str(dl), str(image), "--trust", str(trust))
    assert from_s3.returncode == local.returncode == 0, from_s3.stderr + local.stderr
    a, b = json.loads(from_s3.stdout.splitlines()[0]), json.loads(local.stdout.splitlines()[0])
    assert a["bundle"] == version
    same_keys = set(a) - {"latency_ms", "bundle"}
    assert {k: a[k] for k in same_keys} == {k: b[k] for k in same_keys}, "the same answer as the old bundle's"
    p = load_params(repo / "params.yaml")
    rel = stack.cfg.path("releases", version)
    args = (repo / p.paths.ingest_dir / "manifest.parquet", p.evaluate.split,
            list(p.ingest.mask_facts.size_classes), 1, 8)
    alone = compare(p.release.challenger, rel, None, None, *args, root=repo)
    assert alone["passed"] and alone["summary"].startswith("no champion") and "champion" not in alone["models"]
    same = compare(ChallengerRules(max_auroc_drop=0, max_type_accuracy_drop=0, max_latency_ratio=100), rel, dl,
                   version, *args, root=repo)
    assert same["passed"] and same["delta_auroc"]["delta"] == 0, "the same bundle answers the same, side by side"
    assert all(m["latency_ms_median"] > 0 for m in same["models"].values()) and same["cpu"]
    slow = compare(ChallengerRules(max_auroc_drop=1, max_type_accuracy_drop=1, max_latency_ratio=1e-3), rel, dl,
                   version, *args, root=repo)
    assert not slow["passed"] and "max_latency_ratio" in slow["summary"] and version in slow["summary"]
    # a champion that learned from three of today's test images: they leave the comparison
    df = pd.read_parquet(args[0])
    test_hashes = sorted(df.sha256[df.split == p.evaluate.split])[:3]
    champ = tmp_path / "champ"
    shutil.copytree(dl, champ, ignore=shutil.ignore_patterns("manifest.sig"))
    with open(champ / TRAINING_IMAGES, "a") as f:
        f.write("".join(f"{h}\n" for h in test_hashes))
    fields = {k: v for k, v in json.loads((champ / MANIFEST).read_text()).items()
              if k not in ("format", "format_version", "runtime_api", "files")}
    write_manifest(champ, **fields)
    moved = compare(p.release.challenger, rel, champ, "old", *args, root=repo)
    assert moved["excluded_by_lineage"] == {"candidate": 0, "champion": 3}
    assert moved["images"] == same["images"] - 3
