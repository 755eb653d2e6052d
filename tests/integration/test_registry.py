"""The release registry (edgeqa.release.registry) against the real local SeaweedFS: conditional writes,
publish with the manifest last, immutable versions, S3 dying mid-publish, 8 racing promoters, rollback."""

import json
import multiprocessing as mp
import os
import uuid

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeqa.release.registry import Registry, RegistryError
from edgeqa.release.signing import sign_copy
from edgeqa_runtime.bundle import write_manifest

from ..conftest import REPO

pytestmark = [pytest.mark.integration]

KEY = Ed25519PrivateKey.generate()


def _signed_bundle(tmp_path, version, payload=None):
    src = tmp_path / f"src-{version}"
    src.mkdir()
    (src / "vision.onnx").write_bytes(payload or os.urandom(300_000))
    (src / "runtime.json").write_text(json.dumps({"threshold": 0.4}))
    write_manifest(src, source="distill", version=version)
    out = tmp_path / f"signed-{version}"
    sign_copy(src, out, KEY)
    return out


@pytest.fixture
def registry(stack):
    """A fresh bucket per test on the session's SeaweedFS."""
    s3 = stack.s3_client()
    bucket = f"reg-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return Registry(s3, bucket)


def test_seaweedfs_honours_conditional_writes(registry):
    s3, b = registry.s3, registry.bucket
    etag = s3.put_object(Bucket=b, Key="k", Body=b"1")["ETag"]
    for cond in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
        with pytest.raises(ClientError) as e:
            s3.put_object(Bucket=b, Key="k", Body=b"2", **cond)
        assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == b"1", "a refused write changed nothing"
    s3.put_object(Bucket=b, Key="k", Body=b"3", IfMatch=etag)
    s3.put_object(Bucket=b, Key="new", Body=b"x", IfNoneMatch="*")
    assert s3.get_object(Bucket=b, Key="k")["Body"].read() == b"3"


def test_publish_uploads_every_file_and_the_manifest_last(registry, tmp_path):
    bundle = _signed_bundle(tmp_path, "v1")
    seen = []

    def during(name):  # while files are still arriving, the version does not exist for readers
        seen.append(name)
        assert registry.versions() == [] and registry.manifest("v1") is None

    assert registry.publish(bundle, on_uploaded=during) == {"version": "v1", "created": True}
    assert sorted(seen) == ["manifest.sig", "runtime.json", "vision.onnx"]
    assert [v["version"] for v in registry.versions()] == ["v1"]
    got = registry.download("v1", tmp_path / "dl")
    for f in ("vision.onnx", "runtime.json", "manifest.json", "manifest.sig"):
        assert (got / f).read_bytes() == (bundle / f).read_bytes(), f
    assert registry.publish(bundle) == {"version": "v1", "created": False}, "the same bundle again: a no-op"
    (tmp_path / "o").mkdir()
    other = _signed_bundle(tmp_path / "o", "v1")
    with pytest.raises(RegistryError, match="version v1 is already published with another manifest"):
        registry.publish(other)


def test_an_unsigned_bundle_is_not_published(registry, tmp_path):
    bundle = _signed_bundle(tmp_path, "v1")
    (bundle / "manifest.sig").unlink()
    with pytest.raises(RegistryError, match=r"manifest\.sig is missing: the registry holds signed bundles only"):
        registry.publish(bundle)
    assert registry.versions() == []


def test_s3_stopped_mid_publish_leaves_nothing_visible_and_a_retry_completes(stack, registry, tmp_path):
    bundle = _signed_bundle(tmp_path, "v1")

    def kill_s3(name):
        if name == "runtime.json":  # the first of three uploads done: SeaweedFS goes away
            os.kill(stack.pids()["s3"], 9)

    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever botocore raises for a dead endpoint
            registry.publish(bundle, on_uploaded=kill_s3)
    finally:
        stack.up()  # restarts what is not running, on the same data
    fresh = Registry(stack.s3_client(), registry.bucket)
    assert fresh.versions() == [] and fresh.manifest("v1") is None, "a half-published version is invisible"
    assert fresh.publish(bundle)["created"] is True
    assert [v["version"] for v in fresh.versions()] == ["v1"]


def _promoter(env, bucket, version, barrier, out):
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=env["endpoint"], aws_access_key_id=env["ak"],
                      aws_secret_access_key=env["sk"], region_name="us-east-1",
                      config=Config(s3={"addressing_style": "path"}))
    reg = Registry(s3, bucket)
    barrier.wait()
    out.put(reg.promote(version, "staging", who=f"writer-{version}", reason="race")["seq"])


def test_eight_concurrent_promotions_lose_no_update(stack, registry, tmp_path):
    versions = [f"r{i}" for i in range(8)]
    for v in versions:
        registry.publish(_signed_bundle(tmp_path, v, payload=v.encode() * 10))
    c = stack.credentials()
    env = {"endpoint": stack.cfg.s3_endpoint, "ak": c.access_key, "sk": c.secret_key}
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(len(versions)), ctx.Queue()
    procs = [ctx.Process(target=_promoter, args=(env, registry.bucket, v, barrier, out)) for v in versions]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    seqs = sorted(out.get(timeout=5) for _ in versions)
    assert seqs == list(range(1, 9)), "every promotion got its own sequence number"
    log = registry.audit("staging")
    assert [e["seq"] for e in log] == list(range(1, 9))
    assert sorted(e["to"] for e in log) == versions, "each writer's change is in the log exactly once"
    for prev, e in zip([None, *log], log):
        assert e["from"] == (prev["to"] if prev else None), "each change starts where the previous one ended"
    pointer, _ = registry.pointer("staging")
    assert pointer == log[-1]


def test_promote_and_rollback_restore_the_previous_bundle_byte_for_byte(registry, tmp_path):
    a, b = _signed_bundle(tmp_path, "a"), _signed_bundle(tmp_path, "b")
    registry.publish(a)
    registry.publish(b)
    registry.promote("a", "production", who="alice", reason="first release", gate_report_sha256="g1")
    registry.promote("b", "production", who="bob", reason="better", gate_report_sha256="g2")
    event = registry.rollback("production", who="carol", reason="line complaints")
    assert event["from"] == "b" and event["to"] == "a" and event["action"] == "rollback"
    assert registry.pointer("production")[0]["to"] == "a"
    got = registry.download(registry.pointer("production")[0]["to"], tmp_path / "dl")
    assert (got / "vision.onnx").read_bytes() == (a / "vision.onnx").read_bytes()
    log = registry.audit("production")
    assert [(e["who"], e["from"], e["to"], e["reason"]) for e in log] == [
        ("alice", None, "a", "first release"), ("bob", "a", "b", "better"), ("carol", "b", "a", "line complaints")]
    assert [e["gate_report_sha256"] for e in log[:2]] == ["g1", "g2"] and all(e["when"] for e in log)


def test_a_writer_that_died_after_moving_the_pointer_gets_its_audit_event_written_by_the_next(registry, tmp_path):
    registry.publish(_signed_bundle(tmp_path, "a"))
    registry.publish(_signed_bundle(tmp_path, "b"))
    registry.promote("a", "staging", who="alice")
    registry.s3.delete_object(Bucket=registry.bucket, Key="audit/staging/00000001.json")  # as if it died there
    registry.promote("b", "staging", who="bob")
    assert [(e["seq"], e["to"]) for e in registry.audit("staging")] == [(1, "a"), (2, "b")]


def test_bad_names_are_refused(registry):
    with pytest.raises(RegistryError, match="alias 'prod': allowed aliases are staging, production"):
        registry.pointer("prod")
    with pytest.raises(RegistryError, match="no version 'nope'.*publish it first"):
        registry.promote("nope", "staging")
    with pytest.raises(RegistryError, match="production has no previous version to roll back to"):
        registry.rollback("production")


def test_the_cli_publishes_promotes_audits_and_rolls_back(stack, tmp_path, monkeypatch):
    """`edgeqa publish / releases list|show|audit / promote / rollback` against the session's SeaweedFS (the
    stack is found through EDGEQA_STATE_DIR and the port variables, the registry through
    EDGEQA_RELEASES_BUCKET)."""
    from typer.testing import CliRunner

    from edgeqa.cli import app
    from edgeqa.stack import PORT_KEYS

    monkeypatch.setenv("EDGEQA_STATE_DIR", str(stack.cfg.state_dir))
    for k in PORT_KEYS:
        monkeypatch.setenv(f"EDGEQA_{k.upper()}_PORT", str(stack.cfg.ports[k]))
    bucket = f"reg-cli-{uuid.uuid4().hex[:8]}"  # its own registry (EDGEQA_RELEASES_BUCKET), as a second site would
    stack.s3_client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("EDGEQA_RELEASES_BUCKET", bucket)
    tag = uuid.uuid4().hex[:8]
    a, b = _signed_bundle(tmp_path, f"a-{tag}"), _signed_bundle(tmp_path, f"b-{tag}")

    def cli(*args, code=0):
        r = CliRunner().invoke(app, ["--project", str(REPO), *args], env={"COLUMNS": "200"})
        assert r.exit_code == code, f"edgeqa {' '.join(args)} -> {r.exit_code}:\n{r.output}"
        return r.output

    assert f"published a-{tag}" in cli("publish", str(a))
    assert "already published (nothing uploaded)" in cli("publish", str(a))
    cli("publish", str(b))
    assert "production moves only by a reviewer's signed approval" in cli(
        "promote", f"a-{tag}", "--to", "production", code=2)
    cli("promote", f"a-{tag}", "--to", "staging", "--reason", "first", "--who", "alice")
    cli("promote", f"b-{tag}", "--to", "staging", "--reason", "newer", "--who", "bob")
    listed = {v["version"]: v for v in json.loads(cli("releases", "list", "--json"))}
    assert set(listed) == {f"a-{tag}", f"b-{tag}"}, "the CLI reads the bucket EDGEQA_RELEASES_BUCKET names"
    assert listed[f"b-{tag}"]["aliases"] == ["staging"] and listed[f"a-{tag}"]["aliases"] == []
    shown = json.loads(cli("releases", "show", f"a-{tag}"))
    assert shown["version"] == f"a-{tag}" and set(shown["files"]) == {"vision.onnx", "runtime.json"}
    assert f"staging rolled back: b-{tag} -> a-{tag}" in cli("rollback", "--alias", "staging", "--reason",
                                                               "line complaints", "--who", "carol")
    log = json.loads(cli("releases", "audit", "--alias", "staging", "--json"))
    assert [(e["action"], e["who"], e["to"], e["reason"]) for e in log] == [
        ("promote", "alice", f"a-{tag}", "first"), ("promote", "bob", f"b-{tag}", "newer"),
        ("rollback", "carol", f"a-{tag}", "line complaints")]
    # refusals: exit 2 and a message that names what was wrong
    assert "no version 'nope'" in cli("promote", "nope", "--to", "staging", code=2)
    assert "allowed aliases are staging, production" in cli("promote", f"a-{tag}", "--to", "prod", code=2)
    assert "production has no previous version" in cli("rollback", code=2)
    assert "no version 'nope'" in cli("releases", "show", "nope", code=2)
    (b / "manifest.sig").unlink()
    assert "signed bundles only" in cli("publish", str(b), code=2)
