"""Static checks of deploy/: every YAML parses, the Kubernetes manifests keep their safety settings,
KEDA scales real Deployments on real consumers, and the images stay as lean as intended."""

from __future__ import annotations

import importlib.util
import re
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"

GRPC_PORTS = {"ingest": 50051, "qagen": 50052, "trainer": 50053, "inference": 50054}
GPU_SERVICES = {"trainer", "inference"}
STAGE_OF = {"ingest": "ingest", "qagen": "qagen", "trainer": "train"}


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _k8s_objects() -> list[dict]:
    objs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return objs


def _of_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in _k8s_objects() if o["kind"] == kind}


def _workloads() -> list[dict]:
    return [o for o in _k8s_objects() if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def _containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def _instructions(dockerfile: Path) -> str:
    """The Dockerfile without comments, continuation lines joined."""
    lines = [ln for ln in dockerfile.read_text().splitlines() if not ln.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


def test_every_yaml_file_under_deploy_parses():
    """Each YAML file under deploy/ is valid YAML with at least one document."""
    files = _yaml_files()
    assert len(files) >= 10
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_every_kubernetes_object_is_well_formed():
    """Each manifest has apiVersion, kind and a name, and every workload's selector matches its pods."""
    for obj in _k8s_objects():
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
    for obj in _workloads():
        if obj["kind"] == "Job":
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        for key, value in obj["spec"]["selector"]["matchLabels"].items():
            assert labels.get(key) == value, obj["metadata"]["name"]


def test_each_service_has_a_deployment_and_a_service():
    """ingest, qagen, trainer, inference and gateway each have a Deployment and a matching Service."""
    deployments, services = _of_kind("Deployment"), _of_kind("Service")
    assert set(deployments) == {*GRPC_PORTS, "gateway"}
    for name, dep in deployments.items():
        svc = services[name]
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        container_ports = {
            p["name"]: p["containerPort"] for c in _containers(dep) for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports, (name, port)


def test_grpc_deployments_have_grpc_readiness_and_liveness_probes():
    """Each gRPC service is probed with grpc: on its own port and the overall service ""."""
    deployments = _of_kind("Deployment")
    for name, port in GRPC_PORTS.items():
        (container,) = _containers(deployments[name])
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port, "service": ""}, (name, probe)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["DOCLORA_LISTEN_ADDR"] == f"0.0.0.0:{port}"


def test_the_gateway_is_probed_over_http():
    """The gateway speaks HTTP, so its probes are httpGet /healthz on its HTTP port."""
    (container,) = _containers(_of_kind("Deployment")["gateway"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"


def test_every_workload_runs_as_non_root_on_a_read_only_root_filesystem():
    """Deployments, StatefulSets and Jobs: non-root, read-only root, no privilege escalation, /tmp writable."""
    for obj in _workloads():
        pod = obj["spec"]["template"]["spec"]
        pod_non_root = pod.get("securityContext", {}).get("runAsNonRoot") is True
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            name = f"{obj['metadata']['name']}/{c['name']}"
            assert pod_non_root or sc.get("runAsNonRoot") is True, name
            assert sc.get("readOnlyRootFilesystem") is True, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            if obj["kind"] == "Deployment":
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], name


def test_every_workload_has_resource_requests_and_limits():
    """Each container sets cpu and memory requests and limits."""
    for obj in _workloads():
        for c in _containers(obj):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), (obj["metadata"]["name"], kind)


def test_trainer_and_inference_run_on_gpu_nodes_with_a_model_cache():
    """GPU services ask for nvidia.com/gpu, select and tolerate GPU nodes, and mount /cache."""
    deployments = _of_kind("Deployment")
    for name in GPU_SERVICES:
        pod = deployments[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert pod["nodeSelector"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod["tolerations"])
        assert any(m["mountPath"] == "/cache" for m in container["volumeMounts"])
    for name in {*GRPC_PORTS, "gateway"} - GPU_SERVICES:
        (container,) = _containers(deployments[name])
        assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_keda_scaled_objects_target_deployments_and_work_consumers():
    """Each ScaledObject scales an existing Deployment on the lag of its own work-<stage> consumer."""
    deployments = _of_kind("Deployment")
    scaled = [o for o in _k8s_objects() if o["kind"] == "ScaledObject"]
    assert {o["spec"]["scaleTargetRef"]["name"] for o in scaled} == set(STAGE_OF)
    for obj in scaled:
        target = obj["spec"]["scaleTargetRef"]["name"]
        assert target in deployments
        assert obj["spec"]["minReplicaCount"] >= 1, "stages also serve gRPC and must not scale to zero"
        triggers = obj["spec"]["triggers"]
        # the normal lane and the urgent lane (priority > 0) of the stage, as bus.py names them
        from services.common.bus import URGENT_LANE, _work_durable

        stage = STAGE_OF[target]
        assert [t["metadata"]["consumer"] for t in triggers] == [
            _work_durable(stage),
            _work_durable(stage, URGENT_LANE),
        ]
        for trigger in triggers:
            meta = trigger["metadata"]
            assert trigger["type"] == "nats-jetstream"
            assert meta["stream"] == "WORK"
            assert re.fullmatch(r"work-(ingest|qagen|train)(-urgent)?", meta["consumer"])
            assert meta["natsServerMonitoringEndpoint"].endswith(":8222")
            assert meta["account"] == "$G"


def test_nats_runs_jetstream_and_exposes_its_monitoring_port():
    """The NATS StatefulSet enables JetStream on a volume, and its Service exposes 4222 and 8222."""
    (container,) = _containers(_of_kind("StatefulSet")["nats"])
    assert "--jetstream" in container["args"]
    ports = {p["port"] for p in _of_kind("Service")["nats"]["spec"]["ports"]}
    assert {4222, 8222} <= ports


def test_kustomization_lists_every_manifest():
    """kustomization.yaml names each manifest in deploy/k8s exactly once, and each exists."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kust["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    assert kust["namespace"] == "doclora"


def test_compose_wires_the_stack_with_health_conditions():
    """compose.yaml: JetStream NATS, MinIO with a bucket init, five services with health checks and order."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"nats", "minio", "minio-init", *GRPC_PORTS, "gateway"} <= set(services)
    assert "--jetstream" in services["nats"]["command"]
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"])
    assert "mc mb" in " ".join(services["minio-init"]["entrypoint"])
    for name, port in GRPC_PORTS.items():
        svc = services[name]
        assert svc["environment"]["DOCLORA_LISTEN_ADDR"] == f"0.0.0.0:{port}"
        assert svc["environment"]["DOCLORA_NATS_URL"] == "nats://nats:4222"
        assert svc["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
        assert svc["depends_on"]["nats"]["condition"] == "service_healthy"
        assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
        assert svc["read_only"] is True
    gateway = services["gateway"]
    assert any(str(p).endswith(":8080") for p in gateway["ports"])
    assert {d: c["condition"] for d, c in gateway["depends_on"].items()} == dict.fromkeys(
        GRPC_PORTS, "service_healthy"
    )


def test_every_dockerfile_is_multi_stage_slim_and_non_root():
    """Each image builds on python:3.11-slim in two stages, generates protos, and runs as a numeric user."""
    for name in [*GRPC_PORTS, "gateway"]:
        text = _instructions(DOCKER / f"Dockerfile.{name}")
        assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
        assert len(re.findall(r"^FROM ", text, re.M)) >= 2
        assert "grpc_tools.protoc" in text
        user = re.findall(r"^USER (\S+)", text, re.M)
        assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
        module = "gateway" if name == "gateway" else f"services.{name}"
        assert f'CMD ["python", "-m", "{module}"]' in text


@pytest.mark.parametrize("name", ["ingest", "gateway", "qagen"])
def test_light_images_install_neither_torch_nor_the_ml_extra(name):
    """ingest, gateway (and for now qagen) install no torch and no `ml` extra."""
    text = _instructions(DOCKER / f"Dockerfile.{name}").lower()
    assert "torch" not in text
    assert not re.search(r"\[[^\]]*\bml\b[^\]]*\]", text.replace("['optional-dependencies']['dev']", ""))
    assert "'ml'" not in text and '"ml"' not in text


@pytest.mark.parametrize("name", sorted(GPU_SERVICES))
def test_torch_images_default_to_the_cpu_wheel_with_a_switch(name):
    """trainer and inference take torch from the PyTorch CPU index unless TORCH_INDEX_URL says otherwise."""
    text = _instructions(DOCKER / f"Dockerfile.{name}")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX_URL}"' in text
    assert "['optional-dependencies']['ml']" in text


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    """The root .dockerignore drops .git, the venv, local state and generated code, keeps the health check."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", ".doclora", "doclora", "!deploy/docker/healthcheck.py"} <= set(lines)


def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("doclora_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_image_health_check_follows_grpc_health_status():
    """healthcheck.py grpc exits 0 while the server says SERVING and 1 once it says NOT_SERVING."""
    hc = _load_healthcheck()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert hc.main(["grpc", f"127.0.0.1:{port}"]) == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert hc.main(["grpc", f"127.0.0.1:{port}"]) == 1
    finally:
        server.stop(0)
    assert hc.local_grpc_addr("0.0.0.0:50052") == "127.0.0.1:50052"
    assert hc.local_grpc_addr("[::]:50054") == "127.0.0.1:50054"
