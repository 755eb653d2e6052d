"""The local stack: SeaweedFS (S3) and a Prefect server (SQLite), both on loopback, state in one folder.

`up` is idempotent and health-checks each service with a bounded wait; `down` waits for a clean exit.
S3 credentials are generated at the first `up` and stored with mode 600; the secret is never logged.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

CONFIG = Path("infra") / "stack.yaml"  # relative to the project root
PORT_KEYS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "prefect")


class StackError(RuntimeError):
    """The stack cannot start or be reached; the message says which service, port or bucket, and what to do."""


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(access_key={self.access_key!r}, secret_key='***')"


def _url(env: dict[str, str], key: str) -> str | None:
    v = env.get(key, "").strip()
    if not v:
        return None
    from urllib.parse import urlparse

    u = urlparse(v)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise StackError(f"{key}={v!r} is not an http:// or https:// URL")
    return v


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path
    ports: dict[str, int]
    host: str = "127.0.0.1"
    buckets: dict[str, str] = field(default_factory=lambda: {"dvc": "edgeqa-dvc", "releases": "edgeqa-releases",
                                                             "results": "edgeqa-results"})
    prefect_block: str = "edgeqa-results"
    work_pool: str = "edgeqa-local"
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 40.0
    # an external S3 endpoint and/or Prefect API (a production setup, infra/README.md): nothing is started for
    # it; the S3 keys then come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, never from a file
    s3_url: str | None = None
    s3_keys: Credentials | None = None
    prefect_url: str | None = None

    @classmethod
    def load(cls, project: Path, env: dict[str, str] | None = None, path: Path | None = None) -> StackConfig:
        """The stack of `project` from its infra/stack.yaml (or `path`); a relative state_dir is under the
        project. The environment may move the ports (EDGEQA_<PORT>_PORT), the state folder (EDGEQA_STATE_DIR) and
        the buckets (EDGEQA_<NAME>_BUCKET, e.g. EDGEQA_RELEASES_BUCKET for a second registry)."""
        env = dict(os.environ if env is None else env)
        path = Path(path) if path is not None else Path(project) / CONFIG
        if not path.is_file():
            raise StackError(f"{path} is missing: the local stack's ports and buckets are configured there")
        raw = yaml.safe_load(path.read_text())
        ports = dict(raw["ports"])
        unknown = set(ports) - set(PORT_KEYS)
        if unknown or set(PORT_KEYS) - set(ports):
            raise StackError(f"{path}: ports must have exactly the keys {list(PORT_KEYS)}")
        for k in PORT_KEYS:
            v: object = env.get(f"EDGEQA_{k.upper()}_PORT", ports[k])
            try:
                ports[k] = int(str(v))
            except (TypeError, ValueError):
                raise StackError(f"port {k} (EDGEQA_{k.upper()}_PORT): {v!r} is not an integer") from None
            if not 1 <= ports[k] <= 65535:
                raise StackError(f"port {k} (EDGEQA_{k.upper()}_PORT): {ports[k]} is outside 1..65535")
        state = Path(env.get("EDGEQA_STATE_DIR", raw["state_dir"]))
        if not state.is_absolute():
            state = Path(project).resolve() / state
        host = raw.get("host", "127.0.0.1")
        if host != "127.0.0.1":
            raise StackError(f"{path}: host must be 127.0.0.1 (the stack binds to loopback only), got {host!r}")
        buckets = {str(k): str(env.get(f"EDGEQA_{str(k).upper()}_BUCKET") or v) for k, v in raw["buckets"].items()}
        s3_url = _url(env, "EDGEQA_S3_ENDPOINT")
        prefect_url = _url(env, "EDGEQA_PREFECT_API_URL")
        if prefect_url is not None and not prefect_url.rstrip("/").endswith("/api"):
            raise StackError(f"EDGEQA_PREFECT_API_URL={prefect_url!r} must be the server's API URL, ending in /api "
                             f"(e.g. http://prefect-server:4200/api)")
        keys = None
        if s3_url is not None:
            missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
            if missing:
                raise StackError(f"EDGEQA_S3_ENDPOINT is set ({s3_url}), so the S3 keys come from the environment; "
                                 f"{' and '.join(missing)} missing (in Kubernetes: the edgeqa-s3 Secret)")
            keys = Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        return cls(state_dir=state, ports=ports, host=host, buckets=buckets,
                   prefect_block=raw["prefect_block"],
                   work_pool=str(env.get("EDGEQA_WORK_POOL") or raw.get("work_pool", "edgeqa-local")),
                   start_timeout_s=float(raw["timeouts"]["start_s"]),
                   stop_timeout_s=float(raw["timeouts"]["stop_s"]),
                   s3_url=s3_url, s3_keys=keys, prefect_url=prefect_url.rstrip("/") if prefect_url else None)

    def with_ports(self, **ports: int) -> StackConfig:
        return replace(self, ports={**self.ports, **ports})

    def external(self, svc: str) -> bool:
        """Whether `svc` (s3, prefect, worker) runs elsewhere: `up` neither starts nor stops it. The local worker
        serves the local server only; with an external server, the setup's own workers serve its pools."""
        return (self.s3_url if svc == "s3" else self.prefect_url) is not None

    @property
    def s3_endpoint(self) -> str:
        return self.s3_url or f"http://{self.host}:{self.ports['s3']}"

    @property
    def prefect_api_url(self) -> str:
        return self.prefect_url or f"http://{self.host}:{self.ports['prefect']}/api"

    @property
    def prefect_ui_url(self) -> str:
        return self.prefect_api_url.removesuffix("/api")

    def path(self, *parts: str) -> Path:
        return self.state_dir.joinpath(*parts)



def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports, drawn below the kernel's ephemeral range.

    Ports from bind(0) come from the ephemeral range, which the services' own outgoing connections also use,
    so such a port can be taken between choosing it and binding it. Below that range only listeners compete.
    """
    import random

    rng = random.SystemRandom()
    hi = min(_ephemeral_low(), 65536) - 1
    lo = 20000 if hi > 21000 else 1024
    out: list[int] = []
    while len(out) < n:
        p = rng.randint(lo, hi)
        if p not in out and not port_in_use("127.0.0.1", p):
            out.append(p)
    return out


def free_port() -> int:
    return free_ports(1)[0]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found; install the project first (`make setup`)")
    return found


class Stack:
    # the worker runs deployments' flow runs from the process work pool: a suspended release resumes there
    SERVICES = ("s3", "prefect", "worker")

    def __init__(self, cfg: StackConfig):
        self.cfg = cfg

    # ------------------------------------------------------------------------------ credentials
    def credentials(self, create: bool = False) -> Credentials:
        if self.cfg.s3_keys is not None:
            return self.cfg.s3_keys
        path = self.cfg.path("credentials.json")
        if path.exists():
            data = json.loads(path.read_text())
            return Credentials(data["access_key"], data["secret_key"])
        if not create:
            raise StackError(f"no S3 credentials at {path}; run `edgeqa up` first")
        path.parent.mkdir(parents=True, exist_ok=True)
        creds = Credentials("EQ" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30))
        self._write_private(path, json.dumps({"access_key": creds.access_key, "secret_key": creds.secret_key}))
        return creds

    @staticmethod
    def _write_private(path: Path, text: str) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def s3_env(self) -> dict[str, str]:
        """Environment for boto3/DVC clients: endpoint and credentials (never logged)."""
        c = self.credentials()
        return {"AWS_ACCESS_KEY_ID": c.access_key, "AWS_SECRET_ACCESS_KEY": c.secret_key,
                "AWS_ENDPOINT_URL_S3": self.cfg.s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def s3_client(self, creds: Credentials | None = None) -> Any:
        import boto3
        from botocore.config import Config

        c = creds or self.credentials()
        return boto3.client("s3", endpoint_url=self.cfg.s3_endpoint, aws_access_key_id=c.access_key,
                            aws_secret_access_key=c.secret_key, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                          connect_timeout=3, read_timeout=10))

    # ------------------------------------------------------------------------------ processes
    def _pidfile(self, svc: str) -> Path:
        return self.cfg.path("run", f"{svc}.pid")

    def _pid(self, svc: str) -> int | None:
        f = self._pidfile(svc)
        if not f.exists():
            return None
        try:
            pid = int(f.read_text().strip())
        except ValueError:
            return None
        return pid if _pid_alive(pid) else None

    def _ports_of(self, svc: str) -> list[str]:
        if svc == "worker":
            return []
        return ["prefect"] if svc == "prefect" else [k for k in PORT_KEYS if k != "prefect"]

    def _check_ports_free(self, svc: str) -> None:
        taken = [k for k in self._ports_of(svc) if port_in_use(self.cfg.host, self.cfg.ports[k])]
        if taken:
            detail = ", ".join(f"{k}={self.cfg.ports[k]} (EDGEQA_{k.upper()}_PORT)" for k in taken)
            raise StackError(f"cannot start {svc}: port(s) already in use on {self.cfg.host}: {detail}. "
                             f"Stop what holds them, or choose other ports in infra/stack.yaml or the "
                             f"environment variables named.")

    def _weed_cmd(self) -> list[str]:
        # -volume.max: each bucket is a collection that takes about 7 volumes at its first write; 50 allowed 7
        # buckets and the 8th write failed with InternalError ("failed to find writable volumes"). Volumes are
        # sparse files, so 300 (about 40 buckets: the registry's tests use one each) costs no disk up front.
        p, h = self.cfg.ports, self.cfg.host
        return [_bin("weed"), "server", f"-ip={h}", f"-ip.bind={h}", f"-dir={self.cfg.path('seaweedfs')}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                f"-s3.config={self.cfg.path('s3.json')}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-iam=false", "-master.volumeSizeLimitMB=512", "-volume.max=300", "-master.telemetry=false",
                "-volume.preStopSeconds=1", "-master.electionTimeout=1s"]

    def prefect_env(self) -> dict[str, str]:
        if self.cfg.external("prefect"):  # a client of someone else's server: its URL, nothing of a local one
            return {"PREFECT_API_URL": self.cfg.prefect_api_url, "PREFECT_LOGGING_LEVEL": "WARNING"}
        home = self.cfg.path("prefect")
        return {"PREFECT_HOME": str(home),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_API_HOST": self.cfg.host,
                "PREFECT_SERVER_API_PORT": str(self.cfg.ports["prefect"]),
                "PREFECT_UI_API_URL": self.cfg.prefect_api_url, "PREFECT_API_URL": self.cfg.prefect_api_url,
                "PREFECT_LOGGING_LEVEL": "WARNING"}

    @staticmethod
    def prefect_db_template() -> Path:
        """A schema-only Prefect DB for the installed Prefect version, built once by `make setup`."""
        from importlib.metadata import version

        return Path(sys.prefix) / "share" / "edgeqa" / f"prefect-{version('prefect')}.db"

    @classmethod
    def build_prefect_db_template(cls) -> Path:
        """Run Prefect's own migrations into the template (temp name, then rename). Idempotent."""
        target = cls.prefect_db_template()
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({"PREFECT_HOME": str(target.parent / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}"})
        r = subprocess.run([_bin("prefect"), "server", "database", "upgrade", "-y"], env=env, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise StackError(f"prefect server database upgrade failed: {r.stderr[-1500:]}")
        tmp.replace(target)
        return target

    def _start(self, svc: str) -> None:
        self.cfg.path("logs").mkdir(parents=True, exist_ok=True)
        self.cfg.path("run").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        if svc == "s3":
            creds = self.credentials(create=True)
            self.cfg.path("seaweedfs").mkdir(parents=True, exist_ok=True)
            s3cfg = {"identities": [{"name": "edgeqa", "credentials": [
                {"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
            self._write_private(self.cfg.path("s3.json"), json.dumps(s3cfg))
            cmd = self._weed_cmd()
        elif svc == "worker":
            # the worker's flow runs inherit this environment: INFO so their logs reach the Prefect UI
            env.update({**self.prefect_env(), "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "3",
                        # a resumed run finds the results of the tasks it ran before it was suspended
                        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
                        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"s3-bucket/{self.cfg.prefect_block}",
                        "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
                        "HF_HUB_OFFLINE": "1"})  # its runs' stages never download weights
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
            # its flow runs load this same stack (StackConfig.load reads these); a run may override the buckets
            env.update({"EDGEQA_STATE_DIR": str(self.cfg.state_dir),
                        **{f"EDGEQA_{k.upper()}_PORT": str(v) for k, v in self.cfg.ports.items()},
                        **{f"EDGEQA_{k.upper()}_BUCKET": v for k, v in self.cfg.buckets.items()}})
            if self.cfg.external("s3"):
                env.update({"EDGEQA_S3_ENDPOINT": self.cfg.s3_endpoint,
                            "AWS_ACCESS_KEY_ID": self.credentials().access_key,
                            "AWS_SECRET_ACCESS_KEY": self.credentials().secret_key})
            cmd = [_bin("prefect"), "worker", "start", "--pool", self.cfg.work_pool, "--type", "process",
                   "--name", f"edgeqa-{self.cfg.ports['prefect']}"]
        else:
            self.cfg.path("prefect").mkdir(parents=True, exist_ok=True)
            db = self.cfg.path("prefect", "prefect.db")
            template = self.prefect_db_template()
            if not db.exists() and template.exists():  # skip the one-time migrations of a new DB
                shutil.copyfile(template, db.with_name(".prefect.db.tmp"))
                db.with_name(".prefect.db.tmp").replace(db)
            env.update(self.prefect_env())
            cmd = [_bin("prefect"), "server", "start", "--host", self.cfg.host,
                   "--port", str(self.cfg.ports["prefect"])]
        with open(self.cfg.path("logs", f"{svc}.log"), "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=self.cfg.state_dir, start_new_session=True)
        self._pidfile(svc).write_text(str(proc.pid))

    def healthy(self, svc: str) -> bool:
        import urllib.error
        import urllib.request

        if svc == "prefect":
            try:
                with urllib.request.urlopen(f"{self.cfg.prefect_api_url}/health", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError, TimeoutError):
                return False
        if svc == "worker":
            return self._worker_online()
        try:
            self.s3_client().list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False

    def _worker_online(self) -> bool:
        """The worker has registered with the server and sent a heartbeat (status ONLINE) for our pool."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.cfg.prefect_api_url}/work_pools/{self.cfg.work_pool}/workers/filter",
                                     data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=3) as r:
                workers = json.loads(r.read())
        except (urllib.error.URLError, OSError, TimeoutError, ValueError):
            return False
        name = f"edgeqa-{self.cfg.ports['prefect']}"
        return any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers)

    def _wait(self, svc: str) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if self.healthy(svc):
                return
            if self._pid(svc) is None:
                tail = self._log_tail(svc)
                log = self.cfg.path("logs", f"{svc}.log")
                raise StackError(f"{svc} exited during start-up; last log lines ({log}):\n{tail}")
            time.sleep(0.25)
        log = self.cfg.path("logs", f"{svc}.log")
        raise StackError(f"{svc} not healthy after {self.cfg.start_timeout_s:.0f} s; see {log}")

    def _log_tail(self, svc: str, n: int = 15) -> str:
        try:
            lines = self.cfg.path("logs", f"{svc}.log").read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return ""
        secret = self.credentials().secret_key if self.cfg.path("credentials.json").exists() else None
        return "\n".join(ln.replace(secret, "***") if secret else ln for ln in lines)

    # ------------------------------------------------------------------------------ public
    def up(self) -> dict[str, str]:
        """Start what is not running, wait until healthy, create buckets and the Prefect results block."""
        started = []
        for svc in ("s3", "prefect"):
            if self.cfg.external(svc):
                if not self.healthy(svc):
                    what = ("EDGEQA_S3_ENDPOINT", "S3") if svc == "s3" else ("EDGEQA_PREFECT_API_URL", "Prefect API")
                    url = self.cfg.s3_endpoint if svc == "s3" else self.cfg.prefect_api_url
                    raise StackError(f"the external {what[1]} at {url} ({what[0]}) does not answer; edgeqa starts "
                                     f"nothing for it. Check the URL, the network and the service")
                continue
            if self._pid(svc) is not None and self.healthy(svc):
                continue
            if self._pid(svc) is not None:  # running but not (yet) healthy: wait for it
                started.append(svc)
                continue
            self._check_ports_free(svc)
            self._start(svc)
            started.append(svc)
        for svc in started:
            self._wait(svc)
        if self.cfg.external("prefect"):
            pass  # the external server's own workers serve its pools (infra/)
        elif self._pid("worker") is None:  # it needs the server: it creates the process pool at its first start
            self._start("worker")
            self._wait("worker")
        elif not self.healthy("worker"):
            self._wait("worker")
        self.ensure_buckets()
        self.ensure_prefect_block()
        return self.status()

    def down(self) -> None:
        for svc in reversed(self.SERVICES):
            pid = self._pid(svc)
            if pid is None:
                self._pidfile(svc).unlink(missing_ok=True)
                continue
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + self.cfg.stop_timeout_s
            while time.monotonic() < deadline and _pid_alive(pid):
                time.sleep(0.2)
            if _pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
                while _pid_alive(pid):
                    time.sleep(0.1)
            self._pidfile(svc).unlink(missing_ok=True)

    def status(self) -> dict[str, str]:
        out = {}
        for svc in self.SERVICES:
            pid = self._pid(svc)
            if self.cfg.external(svc):
                out[svc] = "external" + (": healthy" if svc != "worker" and self.healthy(svc) else "")
                continue
            out[svc] = "down" if pid is None else ("healthy" if self.healthy(svc) else f"starting (pid {pid})")
        out["s3_endpoint"] = self.cfg.s3_endpoint
        out["prefect_ui"] = self.cfg.prefect_ui_url
        return out

    def pids(self) -> dict[str, int]:
        return {svc: pid for svc in self.SERVICES if (pid := self._pid(svc)) is not None}

    def check_s3(self, creds: Credentials | None = None) -> None:
        """Raise a clear StackError if S3 is unreachable or rejects the credentials (naming the endpoint and
        access key, never the secret)."""
        from botocore.exceptions import ClientError, EndpointConnectionError

        try:
            self.s3_client(creds).list_buckets()
        except EndpointConnectionError:
            raise StackError(f"S3 endpoint {self.cfg.s3_endpoint} is unreachable; start it with `edgeqa up`") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            ak = (creds or self.credentials()).access_key
            raise StackError(f"S3 endpoint {self.cfg.s3_endpoint} rejected the credentials for access key {ak} "
                             f"({code}); the keys live in {self.cfg.path('credentials.json')}") from None

    def ensure_buckets(self) -> None:
        self.check_s3()
        s3 = self.s3_client()
        have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for name in self.cfg.buckets.values():
            if name not in have:
                s3.create_bucket(Bucket=name)

    def _block_exists(self) -> bool:
        import urllib.error
        import urllib.request

        url = (f"{self.cfg.prefect_api_url}/block_types/slug/s3-bucket/block_documents/name/"
               f"{self.cfg.prefect_block}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def ensure_prefect_block(self) -> None:
        """Register the prefect-aws S3Bucket block that flows persist their results to.

        Skipped when the block exists and was registered for the same endpoint, key and bucket.
        """
        import hashlib

        c = self.credentials()
        fp = hashlib.sha256("|".join([self.cfg.s3_endpoint, c.access_key, c.secret_key, self.cfg.buckets["results"],
                                      self.cfg.prefect_block]).encode()).hexdigest()
        marker = self.cfg.path("run", "prefect-block.sha256")
        if marker.exists() and marker.read_text() == fp and self._block_exists():
            return
        env = {**os.environ, **self.prefect_env(), "PREFECT_LOGGING_LEVEL": "ERROR"}
        code = (
            "import sys\n"
            "from prefect_aws import AwsCredentials, S3Bucket\n"
            "from prefect_aws.client_parameters import AwsClientParameters\n"
            "ak, sk, ep, bucket, name = sys.stdin.read().split('\\n')[:5]\n"
            "creds = AwsCredentials(aws_access_key_id=ak, aws_secret_access_key=sk, region_name='us-east-1',\n"
            "    aws_client_parameters=AwsClientParameters(endpoint_url=ep,\n"
            "        config={'s3': {'addressing_style': 'path'}}))\n"
            "S3Bucket(bucket_name=bucket, credentials=creds).save(name, overwrite=True)\n"
        )
        payload = "\n".join([c.access_key, c.secret_key, self.cfg.s3_endpoint, self.cfg.buckets["results"],
                             self.cfg.prefect_block])
        r = subprocess.run([sys.executable, "-c", code], input=payload, text=True, capture_output=True, env=env,
                           timeout=120)
        if r.returncode != 0:
            err = r.stderr.replace(c.secret_key, "***")[-2000:]
            raise StackError(f"could not register the Prefect S3Bucket block {self.cfg.prefect_block!r}:\n{err}")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp)

    def configure_dvc(self, repo: Path) -> None:
        """Point the DVC remote `store` at this stack; credentials go to .dvc/config.local (mode 600)."""
        c = self.credentials()
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        for key, val in (("endpointurl", self.cfg.s3_endpoint), ("access_key_id", c.access_key),
                         ("secret_access_key", c.secret_key), ("url", f"s3://{self.cfg.buckets['dvc']}/cache")):
            # `--`: a value may begin with "-" (a generated secret does about once in 64), which argparse would
            # otherwise read as an option ("unrecognized arguments")
            r = subprocess.run([_bin("dvc"), "remote", "modify", "--local", "store", key, "--", val], cwd=repo,
                               env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise StackError(f"dvc remote modify store {key} failed in {repo}: "
                                 f"{r.stderr.replace(c.secret_key, '***').strip()}")
        local = Path(repo) / ".dvc" / "config.local"
        if local.exists():
            os.chmod(local, 0o600)
