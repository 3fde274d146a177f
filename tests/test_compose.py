"""compose.yaml and the Dockerfile: what containers run is what the tests run.

There is no Docker engine here, so the files are checked for what matters:
every container command is exactly the command `mmserve.launcher` starts in
the integration tests, every service has a healthcheck and waits for its
dependencies to be healthy, the encoder and decoder can be scaled, config
comes from env vars with defaults, the images run as a non-root user without
build tools, and `docker-compose config` accepts the files (CI installs it).
The healthcheck commands themselves are run against real services.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from mmserve.launcher import SERVICE_COMMANDS, resolve_command
from mmserve.localredis import AOF_ARGS
from tests.conftest import Stack

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_container_commands_are_the_tested_commands(compose: dict) -> None:
    services = compose["services"]
    for role, command in SERVICE_COMMANDS.items():
        assert services[role]["command"] == command, role


def test_compose_shape(compose: dict) -> None:
    assert "version" not in compose
    services = compose["services"]
    assert set(services) == {"token", "redis", "encoder", "decoder", "gateway"}
    for name, service in services.items():
        if name != "token":
            assert "healthcheck" in service, name
        for dependency, condition in service.get("depends_on", {}).items():
            wanted = "service_completed_successfully" if dependency == "token" else "service_healthy"
            assert condition == {"condition": wanted}, name
    assert services["decoder"]["depends_on"].keys() == {"redis", "encoder", "token"}
    assert services["gateway"]["depends_on"].keys() == {"decoder", "token"}
    redis_command = " ".join(services["redis"]["command"])
    assert "--maxmemory " in redis_command and "--maxmemory-policy allkeys-lru" in redis_command
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "redis-data:/data" in services["redis"]["volumes"] and "redis-data" in compose["volumes"]
    for role in ("encoder", "decoder"):  # scalable: no fixed names, no host ports
        assert "ports" not in services[role] and "container_name" not in services[role]
        assert "models:/home/mmserve/.cache" in services[role]["volumes"]
    assert services["decoder"]["environment"]["MMSERVE_ENCODER_TARGET"] == "dns:///encoder:50051"
    assert services["gateway"]["environment"]["MMSERVE_DECODER_TARGET"] == "dns:///decoder:50052"
    assert "models" in compose["volumes"]


def test_the_token_job_gives_every_service_one_shared_token(compose: dict) -> None:
    """Service-to-service auth is on by default: a one-shot job writes the token once, the services read it."""
    services = compose["services"]
    path = services["token"]["command"][-1]
    assert (
        services["token"]["command"] == ["mmserve", "token", path] and f"secrets:{path.rsplit('/', 1)[0]}" in services["token"]["volumes"]
    )
    for role in ("encoder", "decoder", "gateway"):
        assert services[role]["environment"]["MMSERVE_SERVICE_TOKEN_FILE"] == path, role
        assert f"secrets:{path.rsplit('/', 1)[0]}:ro" in services[role]["volumes"], role
        assert services[role]["depends_on"]["token"] == {"condition": "service_completed_successfully"}, role


def test_mmserve_token_writes_once_and_services_read_it(tmp_path: Path) -> None:
    from mmserve.cli import main
    from mmserve.config import Settings
    from mmserve.rpc.auth import service_token

    path = tmp_path / "run" / "service-token"
    assert main(["token", str(path)]) == 0
    first = path.read_text()
    assert len(first.strip()) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert main(["token", str(path)]) == 0 and path.read_text() == first  # kept across restarts
    assert service_token(Settings(service_token_file=path)) == first.strip()
    assert service_token(Settings(service_token_file=path, service_token="env-wins")) == "env-wins"


def test_redis_persists_like_mmserve_up(compose: dict) -> None:
    """Compose's Redis appends to a file on its volume with the flags `mmserve up`'s Redis uses (defaults filled in)."""
    command = [re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", arg) for arg in compose["services"]["redis"]["command"]]
    flags = [command[i : i + 2] for i in range(1, len(command), 2)]
    assert [list(AOF_ARGS[i : i + 2]) for i in range(0, len(AOF_ARGS), 2)] == [f for f in flags if f[0] in AOF_ARGS]
    assert ["--dir", "/data"] in flags and ["--save", ""] in flags


def test_cluster_override_points_the_store_at_a_cluster() -> None:
    """compose.cluster.yaml: three cluster nodes with the single Redis's memory policy, slots assigned before the services start."""
    override = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())
    services = override["services"]
    nodes = [name for name in services if re.fullmatch(r"redis-c\d", name)]
    assert len(nodes) == 3
    for name in nodes:
        command = " ".join(services[name]["command"])
        assert "--cluster-enabled yes" in command and "--maxmemory-policy allkeys-lru" in command
        assert services[name]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "--cluster create" in " ".join(services["redis-cluster-init"]["command"])
    for role in ("encoder", "decoder"):
        assert services[role]["environment"]["MMSERVE_REDIS_URL"] == "redis+cluster://" + ",".join(f"{n}:6379" for n in nodes)
        assert services[role]["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}


def test_config_comes_from_env_vars_with_defaults() -> None:
    text = (ROOT / "compose.yaml").read_text()
    for name in re.findall(r"\$\{([A-Z0-9_]+)", text):
        assert re.search(rf"\$\{{{name}:-[^}}]*\}}", text), f"${{{name}}} has no default"
    assert "${MMSERVE_MODEL:-tiny}" in text


def test_docker_compose_accepts_the_files() -> None:
    """Runs wherever docker-compose is installed (CI installs it); the YAML checks above run everywhere."""
    exe = shutil.which("docker-compose")
    if exe is None:
        assert yaml.safe_load((ROOT / "compose.gpu.yaml").read_text())["services"]["decoder"]["deploy"]
        return
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"], ["compose.yaml", "compose.cluster.yaml"]):
        args = [exe, *[x for f in files for x in ("-f", f)], "config", "-q"]
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_dockerfile_final_images_are_non_root_and_without_build_tools() -> None:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or "final"
            stages[current] = [match.group(1)]
        elif current:
            stages[current].append(line)
    for final in ("gateway", "services"):
        body = "\n".join(stages[final])
        assert "USER mmserve" in body and "build-essential" not in body and "apt-get install" not in body, final
        base = stages[final][0]
        assert "build" not in "\n".join(stages.get(base, [])), f"{final} must not inherit a build stage"
    gateway_build = "\n".join(stages["build-gateway"])
    assert "'.[gateway," in gateway_build and "torch" not in gateway_build and "'.[serve]'" not in gateway_build


def test_healthcheck_commands_work_against_real_services(stack: Stack) -> None:
    """The same `mmserve health` the containers run: 0 when serving, 1 when nothing answers."""
    health = resolve_command(["mmserve", "health"])
    for target in (stack.encoder.target, stack.decoder.target, f"http://127.0.0.1:{stack.gateway.port}/health"):
        assert subprocess.run([*health, target], timeout=30).returncode == 0, target
    assert subprocess.run([*health, "127.0.0.1:1", "--timeout", "1"], timeout=30).returncode == 1
