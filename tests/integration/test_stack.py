"""The real local stack (SeaweedFS + Prefect server) started once per session on free loopback ports."""

import json
import subprocess

import psutil
import pytest

from edgeqa.stack import Credentials, Stack, StackConfig, StackError, free_port

from ..conftest import REPO

pytestmark = pytest.mark.integration


def _listening(pid: int) -> list[tuple[str, int]]:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    out = []
    for p in procs:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                out.append((c.laddr.ip, c.laddr.port))
    return out


def test_every_listening_socket_is_on_loopback(stack):
    socks = [s for pid in stack.pids().values() for s in _listening(pid)]
    assert len(socks) >= 9, socks  # 8 SeaweedFS ports + the Prefect server
    assert {ip for ip, _ in socks} == {"127.0.0.1"}, socks
    assert {port for _, port in socks} >= set(stack.cfg.ports.values()), "every configured port is in use"


def test_up_is_idempotent_and_status_is_healthy(stack):
    pids = stack.pids()
    stack.up()
    assert stack.pids() == pids
    st = stack.status()
    assert st["s3"] == "healthy" and st["prefect"] == "healthy" and st["worker"] == "healthy"


def test_buckets_and_s3_round_trip(stack):
    s3 = stack.s3_client()
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert set(stack.cfg.buckets.values()) <= names
    bucket = stack.cfg.buckets["releases"]
    s3.put_object(Bucket=bucket, Key="t/roundtrip.bin", Body=b"\x00edgeqa\xff")
    assert s3.get_object(Bucket=bucket, Key="t/roundtrip.bin")["Body"].read() == b"\x00edgeqa\xff"
    s3.delete_object(Bucket=bucket, Key="t/roundtrip.bin")


def test_credentials_are_private_and_never_printed(stack):
    path = stack.cfg.path("credentials.json")
    assert path.stat().st_mode & 0o777 == 0o600
    assert stack.cfg.path("s3.json").stat().st_mode & 0o777 == 0o600
    c = stack.credentials()
    assert c.secret_key not in repr(c) and "***" in repr(c)


def test_wrong_credentials_give_a_clear_error(stack):
    bad = Credentials(stack.credentials().access_key, "wrong-secret")
    with pytest.raises(StackError) as ei:
        stack.check_s3(bad)
    msg = str(ei.value)
    assert stack.cfg.s3_endpoint in msg and "rejected the credentials" in msg and bad.access_key in msg
    assert "wrong-secret" not in msg


def test_s3_unreachable_gives_a_clear_error(stack, tmp_path):
    dead = Stack(stack.cfg.with_ports(s3=free_port()))
    with pytest.raises(StackError, match=r"S3 endpoint http://127\.0\.0\.1:\d+ is unreachable; start it with"):
        dead.check_s3(stack.credentials())


def test_port_already_in_use_gives_a_clear_error(stack, tmp_path):
    """A second stack on the same ports refuses to start and names the port and its setting."""
    other = Stack(StackConfig(state_dir=tmp_path / "other", ports=dict(stack.cfg.ports), buckets=stack.cfg.buckets))
    with pytest.raises(StackError) as ei:
        other.up()
    msg = str(ei.value)
    assert "already in use" in msg and f"s3={stack.cfg.ports['s3']} (EDGEQA_S3_PORT)" in msg
    assert not other.pids(), "nothing was started"


def test_prefect_results_block_points_at_the_results_bucket(stack, prefect_api):
    from prefect_aws import S3Bucket

    block = S3Bucket.load(stack.cfg.prefect_block)
    assert block.bucket_name == stack.cfg.buckets["results"]
    block.write_path("probe/x.txt", b"ok")
    assert block.read_path("probe/x.txt") == b"ok"


def test_secret_appears_in_no_log_and_no_tracked_file(stack, flow_run):
    secret = stack.credentials().secret_key
    for log in stack.cfg.path("logs").iterdir():
        assert secret not in log.read_text(errors="replace"), log
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for f in tracked:
        p = REPO / f
        if p.is_file():
            assert secret not in p.read_text(errors="replace"), f
    repo = flow_run["repo"]
    for p in [*(repo / "reports").rglob("*"), repo / "dvc.lock", repo / ".dvc" / "config"]:
        if p.is_file():
            assert secret not in p.read_text(errors="replace"), p
    assert (repo / ".dvc" / "config.local").stat().st_mode & 0o777 == 0o600


def test_stack_config_env_overrides_and_validation(tmp_path):
    cfg = StackConfig.load(REPO, env={"EDGEQA_S3_PORT": "18999", "EDGEQA_STATE_DIR": str(tmp_path)})
    assert cfg.ports["s3"] == 18999 and cfg.state_dir == tmp_path
    assert StackConfig.load(tmp_path / "elsewhere", env={}, path=REPO / "infra" / "stack.yaml").state_dir == \
        (tmp_path / "elsewhere" / ".edgeqa").resolve(), "a relative state dir belongs to the project, not the install"
    with pytest.raises(StackError, match="stack.yaml is missing"):
        StackConfig.load(tmp_path, env={})
    with pytest.raises(StackError, match=r"port prefect \(EDGEQA_PREFECT_PORT\): 'x' is not an integer"):
        StackConfig.load(REPO, env={"EDGEQA_PREFECT_PORT": "x"})
    with pytest.raises(StackError, match="outside 1..65535"):
        StackConfig.load(REPO, env={"EDGEQA_MASTER_PORT": "70000"})
    assert json.dumps(cfg.ports)
