"""Fixtures of the integration tests: `edgeqa` as a user runs it, against the session's stack."""

import http.server
import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY = Ed25519PrivateKey.generate()  # the release signing key of this test session


@pytest.fixture
def cli(stack, prefect_api, monkeypatch):
    """`edgeqa` as a user runs it: a process of its own, pointed at the session's stack and Prefect server."""
    from edgeqa.stack import PORT_KEYS

    monkeypatch.setenv("EDGEQA_STATE_DIR", str(stack.cfg.state_dir))
    for k in PORT_KEYS:
        monkeypatch.setenv(f"EDGEQA_{k.upper()}_PORT", str(stack.cfg.ports[k]))
    pem = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    monkeypatch.setenv("EDGEQA_SIGNING_KEY", pem)
    bucket = f"rel-{uuid.uuid4().hex[:8]}"  # this test's own registry: no champion until it promotes one
    stack.s3_client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("EDGEQA_RELEASES_BUCKET", bucket)
    monkeypatch.setenv("COLUMNS", "250")

    def run(repo, *args, code=0):
        r = subprocess.run([sys.executable, "-m", "edgeqa.cli", "--project", str(repo), *args],
                           capture_output=True, text=True, env=os.environ, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == code, f"edgeqa {' '.join(args)} -> {r.returncode}:\n{out[-4000:]}"
        return out

    return run


@pytest.fixture
def webhook():
    """A loopback HTTP receiver: the JSON bodies POSTed to it, in order."""
    got = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's name
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook/{uuid.uuid4().hex}", got
    server.shutdown()
