"""deploy/kubernetes: the kustomize base renders, is valid Kubernetes, and runs what the tests run.

No cluster here, so the base is rendered and checked offline: every object
validates strictly against the Kubernetes JSON schemas that the
`kubernetes-validate` package ships (the oldest and newest versions we
support), every container runs exactly the command `mmserve.launcher` starts
in the integration tests, the gRPC services have grpc.health.v1 probes with a
startup probe long enough for a model load, the encoders and decoders sit
behind headless Services (the clients' dns:/// targets balance round-robin)
and are scaled by HorizontalPodAutoscalers, every service gets the
service-to-service token from its Secret, and the trial Redis appends to a
file on a volume like compose's. Rendering uses `kustomize build` or `kubectl
kustomize` when one is installed (and checks the pure-Python renderer below
against it), else that renderer.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from mmserve.config import Settings
from mmserve.launcher import SERVICE_COMMANDS
from mmserve.localredis import AOF_ARGS
from mmserve.rpc.server import LIVENESS_SERVICE

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "deploy" / "kubernetes"
TOKEN_FILE = "service-token.env"  # written by the user before `kubectl apply -k` (gitignored)
#: The Kubernetes versions the manifests must be valid for: the oldest we support and the newest known.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
#: Kinds without a namespace (the only cluster-scoped kind the base has).
CLUSTER_SCOPED = {"Namespace"}


def render_python(base: Path) -> list[dict]:
    """What `kustomize build` makes of this base, for the features it uses (anything else fails loudly)."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "secretGenerator"}
    assert set(kustomization) <= known, f"render_python does not know {set(kustomization) - known}"
    objects = [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((base / name).read_text()) if doc]
    for generator in kustomization.get("secretGenerator", []):
        assert set(generator) <= {"name", "envs", "options"} and generator["options"] == {"disableNameSuffixHash": True}
        data: dict[str, str] = {}
        for env_file in generator["envs"]:
            for line in (base / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, _, value = line.partition("=")
                    data[key.strip()] = base64.b64encode(value.encode()).decode()
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]}, "type": "Opaque", "data": data})
    for obj in objects:
        metadata = obj.setdefault("metadata", {})
        if "namespace" in kustomization and obj["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = kustomization["namespace"]
        for label_set in kustomization.get("labels", []):
            assert set(label_set) <= {"pairs", "includeSelectors"} and not label_set.get("includeSelectors", False)
            metadata.setdefault("labels", {}).update(label_set["pairs"])
    return objects


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.fixture(scope="module")
def base_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base as a user has it before applying: with a token file written."""
    copy = tmp_path_factory.mktemp("kubernetes") / "base"
    shutil.copytree(BASE, copy, ignore=shutil.ignore_patterns(TOKEN_FILE))
    (copy / TOKEN_FILE).write_text("token=test-token-0123456789abcdef\n")
    return copy


@pytest.fixture(scope="module")
def objects(base_copy: Path) -> list[dict]:
    command = kustomize_command()
    if command is None:
        return render_python(base_copy)
    result = subprocess.run([*command, str(base_copy)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def role_of(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def deployments_by_role(objects: list[dict]) -> dict[str, dict]:
    deployments = list(by_kind(objects, "Deployment").values())
    roles = {role_of(d): d for d in deployments}
    assert len(roles) == len(deployments), "one Deployment per role"
    return roles


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env_of(deployment: dict, configmaps: dict[str, dict]) -> dict[str, object]:
    """The container's environment: its ConfigMaps' values, overridden by its own `env` (values or valueFrom)."""
    c = container(deployment)
    env: dict[str, object] = {}
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in c.get("env", []):
        env[var["name"]] = var.get("value", var.get("valueFrom"))
    return env


@pytest.mark.parametrize("version", VERSIONS)
def test_every_object_validates_strictly_offline(objects: list[dict], version: str) -> None:
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {'.'.join(map(str, error.path))}: {error.message}")


def test_base_has_every_component(objects: list[dict]) -> None:
    kinds = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    for role in ("encoder", "decoder", "gateway"):
        assert ("Deployment", f"mmserve-{role}") in kinds and ("Service", f"mmserve-{role}") in kinds
    assert {("HorizontalPodAutoscaler", "mmserve-encoder"), ("HorizontalPodAutoscaler", "mmserve-decoder")} <= kinds
    assert {("StatefulSet", "mmserve-redis"), ("Secret", "mmserve-service-token"), ("Namespace", "mmserve")} <= kinds
    assert all(obj["metadata"].get("namespace") == "mmserve" for obj in objects if obj["kind"] != "Namespace")


def test_fallback_renderer_matches_kustomize(objects: list[dict], base_copy: Path) -> None:
    """The pure-Python rendering (used where neither kustomize nor kubectl is installed) is kustomize's."""
    if kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    key = lambda obj: (obj["kind"], obj["metadata"]["name"])  # noqa: E731
    assert sorted(render_python(base_copy), key=key) == sorted(objects, key=key)


def test_container_commands_are_the_tested_commands(objects: list[dict]) -> None:
    roles = deployments_by_role(objects)
    assert set(roles) == set(SERVICE_COMMANDS)
    for role, deployment in roles.items():
        c = container(deployment)
        assert [*c["command"], *c.get("args", [])] == SERVICE_COMMANDS[role], role


def test_grpc_services_have_grpc_health_probes_covering_a_model_load(objects: list[dict]) -> None:
    roles = deployments_by_role(objects)
    configmaps = by_kind(objects, "ConfigMap")
    for role in ("encoder", "decoder"):
        c = container(roles[role])
        port = int(env_of(roles[role], configmaps)[f"MMSERVE_{role.upper()}_PORT"])
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == port
        for kind in ("startupProbe", "readinessProbe"):
            assert c[kind]["grpc"] == {"port": port}, (role, kind)  # grpc.health.v1, the whole server ("")
        # liveness: the process only (a store outage makes "" NOT_SERVING: no traffic, but no restart either)
        assert c["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}, role
        startup = c["startupProbe"]
        assert startup["failureThreshold"] * startup["periodSeconds"] >= 600, "the startup probe must allow a 10 min model load"
        for kind in ("readinessProbe", "livenessProbe"):
            assert c[kind].get("initialDelaySeconds", 0) == 0, "the startup probe covers the load"
        assert c["readinessProbe"]["periodSeconds"] <= 10, "a loading or draining pod leaves the endpoints quickly"


def test_gateway_probes_are_http(objects: list[dict]) -> None:
    gateway = deployments_by_role(objects)["gateway"]
    c = container(gateway)
    port = int(env_of(gateway, by_kind(objects, "ConfigMap"))["MMSERVE_GATEWAY_PORT"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == port
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # /health is 503 while no decoder is SERVING: that must take gateways out of the Service, not restart them.
    assert "httpGet" not in c["livenessProbe"] and c["livenessProbe"]["tcpSocket"] == {"port": "http"}
    service = by_kind(objects, "Service")["mmserve-gateway"]["spec"]
    assert service["type"] == "ClusterIP" and service.get("clusterIP") != "None"
    assert service["ports"] == [{"name": "http", "port": port, "targetPort": "http"}]


def test_encoders_and_decoders_are_behind_headless_services_the_clients_resolve(objects: list[dict]) -> None:
    roles = deployments_by_role(objects)
    services = by_kind(objects, "Service")
    configmaps = by_kind(objects, "ConfigMap")
    for role in ("encoder", "decoder"):
        service = services[f"mmserve-{role}"]["spec"]
        assert service["clusterIP"] == "None", f"{role}: headless, so DNS returns every pod and the client balances"
        assert not service.get("publishNotReadyAddresses", False), "only ready (SERVING) pods are resolved"
        pod_labels = roles[role]["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= pod_labels.items()
        assert roles[role]["spec"]["selector"]["matchLabels"] == service["selector"]
        port = {p["name"]: p for p in service["ports"]}["grpc"]
        assert port["targetPort"] == "grpc"
        for deployment in roles.values():  # every client of this role's service points at it
            env = env_of(deployment, configmaps)
            assert env[f"MMSERVE_{role.upper()}_TARGET"] == f"dns:///mmserve-{role}:{port['port']}"


def test_encoders_and_decoders_autoscale_on_cpu(objects: list[dict]) -> None:
    roles = deployments_by_role(objects)
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    for role in ("encoder", "decoder"):
        (hpa,) = [h for h in hpas.values() if h["spec"]["scaleTargetRef"]["name"] == f"mmserve-{role}"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": roles[role]["metadata"]["name"]}
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
        assert "cpu" in container(roles[role])["resources"]["requests"], "CPU utilization needs a CPU request"
    for role, deployment in roles.items():
        resources = container(deployment)["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"], role


def test_every_service_gets_the_service_token_from_its_secret(objects: list[dict]) -> None:
    secret = by_kind(objects, "Secret")["mmserve-service-token"]
    assert base64.b64decode(secret["data"]["token"]) == b"test-token-0123456789abcdef"
    roles = deployments_by_role(objects)
    for role, deployment in roles.items():
        env = env_of(deployment, by_kind(objects, "ConfigMap"))
        assert env["MMSERVE_SERVICE_TOKEN"] == {"secretKeyRef": {"name": "mmserve-service-token", "key": "token"}}, role
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert f"deploy/kubernetes/{TOKEN_FILE}" in ignored, f"deploy/kubernetes/{TOKEN_FILE} holds a secret: it must be gitignored"


def test_settings_are_known_and_valid(objects: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every MMSERVE_* variable is a setting (no typo goes unnoticed), and each container's values parse."""
    known = {f"MMSERVE_{name.upper()}" for name in Settings.model_fields}
    configmaps = by_kind(objects, "ConfigMap")
    for role, deployment in deployments_by_role(objects).items():
        env = env_of(deployment, configmaps)
        assert {name for name in env if name.startswith("MMSERVE_")} <= known, role
        with monkeypatch.context() as patch:
            for name, value in env.items():
                if isinstance(value, str):
                    patch.setenv(name, value)
            settings = Settings()
        assert str(settings.host) == "0.0.0.0", role
        mounts = {m["mountPath"] for m in container(deployment).get("volumeMounts", [])}
        if role != "gateway":  # the model cache is a volume (emptyDir by default)
            assert any(settings.cache_dir.is_relative_to(m) for m in mounts), role


def test_trial_redis_appends_to_a_file_on_a_volume(objects: list[dict]) -> None:
    redis = by_kind(objects, "StatefulSet")["mmserve-redis"]
    c = container(redis)
    command = [*c["command"], *c["args"]]
    assert command[0] == "redis-server"
    flags = [command[i : i + 2] for i in range(1, len(command), 2)]
    assert [list(AOF_ARGS[i : i + 2]) for i in range(0, len(AOF_ARGS), 2)] == [f for f in flags if f[0] in AOF_ARGS]
    assert ["--dir", "/data"] in flags and ["--maxmemory-policy", "allkeys-lru"] in flags
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    service = by_kind(objects, "Service")[redis["spec"]["serviceName"]]
    (port,) = service["spec"]["ports"]
    for deployment in deployments_by_role(objects).values():
        url = env_of(deployment, by_kind(objects, "ConfigMap"))["MMSERVE_REDIS_URL"]
        assert url == f"redis://{service['metadata']['name']}:{port['port']}/0"


def readme_section() -> str:
    return (ROOT / "README.md").read_text().split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]


def test_readme_says_how_to_apply() -> None:
    section = readme_section()
    assert "kubectl apply -k deploy/kubernetes" in section and TOKEN_FILE in section
    assert "redis+cluster://" in section and "MMSERVE_REDIS_URL" in section


def test_readme_overlay_uses_an_external_store(base_copy: Path) -> None:
    """The README's production overlay builds: the store is the external URL, no bundled Redis, the registry's images."""
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed")
    (block,) = re.findall(r"```yaml\n(.*?)\n\s*```", readme_section(), re.S)
    overlay = textwrap.dedent(block)
    tree = base_copy.parent / "tree"
    shutil.copytree(base_copy, tree / "deploy" / "kubernetes")
    (tree / "overlays" / "prod").mkdir(parents=True)
    (tree / "overlays" / "prod" / "kustomization.yaml").write_text(overlay)
    result = subprocess.run([*command, str(tree / "overlays" / "prod")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert not by_kind(rendered, "StatefulSet") and "mmserve-redis" not in by_kind(rendered, "Service")
    assert by_kind(rendered, "ConfigMap")["mmserve-config"]["data"]["MMSERVE_REDIS_URL"].startswith("redis+cluster://")
    for deployment in by_kind(rendered, "Deployment").values():
        assert container(deployment)["image"].startswith("registry.example.com/")
    for obj in rendered:
        kubernetes_validate.validate(obj, VERSIONS[-1], strict=True)
