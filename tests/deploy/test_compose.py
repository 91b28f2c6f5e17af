"""deploy/compose*.yaml and deploy/nginx.conf, checked without Docker.

check-jsonschema validates the compose files against the Compose Specification's own JSON schema
(vendored in the package); crossplane (NGINX's parser) reads nginx.conf; the tests then check that
healthchecks, nginx and the env file agree on /health and the served port.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steerserve.server.settings import ServerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE, GPU = DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"
needs_validator = pytest.mark.skipif(importlib.util.find_spec("check_jsonschema") is None,
                                     reason="check-jsonschema is not installed (pip install check-jsonschema==0.39.0)")


def validate(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           *map(str, files)], capture_output=True, text=True, timeout=120)


@needs_validator
def test_compose_files_follow_the_compose_spec() -> None:
    done = validate(COMPOSE, GPU)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_validator
def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: service_ready"))
    assert validate(broken).returncode != 0


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def env_file() -> dict[str, str]:
    lines = (DEPLOY / "steerserve.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_env_file_sets_only_real_settings() -> None:
    known = {f"STEERSERVE_{name.upper()}" for name in ServerSettings.model_fields}
    assert set(env_file()) <= known, set(env_file()) - known
    assert env_file()["STEERSERVE_HOST"] == "0.0.0.0"


def test_replicas_are_probed_on_health_and_gate_the_load_balancer() -> None:
    services = load(COMPOSE)["services"]
    server, lb = services["steerserve"], services["lb"]
    port = env_file()["STEERSERVE_PORT"]
    assert server["expose"] == [port] and server["deploy"]["replicas"] >= 2
    assert f"http://127.0.0.1:{port}/health" in " ".join(server["healthcheck"]["test"])
    assert int(server["healthcheck"]["start_period"].rstrip("s")) >= 120, "room for the model to load"
    grace = float(env_file()["STEERSERVE_SHUTDOWN_GRACE_S"])
    assert int(server["stop_grace_period"].rstrip("s")) > grace, "SIGKILL only after the drain"
    assert lb["depends_on"]["steerserve"]["condition"] == "service_healthy"
    assert server["build"]["target"] == "cpu"


def test_gpu_override_reserves_one_gpu_per_replica_behind_the_same_name() -> None:
    services = load(GPU)["services"]
    gpu_services = [name for name in services if name.startswith("steerserve")]
    device_ids = []
    for name in gpu_services:
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        device_ids += device["device_ids"]
        assert services[name]["build"]["target"] == "gpu" and services[name]["image"] == "steerserve:gpu"
        assert services[name]["deploy"]["replicas"] == 1, "replicas of one service would share its GPUs"
        if name != "steerserve":
            assert "steerserve" in services[name]["networks"]["default"]["aliases"]
            assert services["lb"]["depends_on"][name]["condition"] == "service_healthy"
    assert len(device_ids) == len(set(device_ids)) == len(gpu_services) >= 2


def nginx_directives() -> list[dict]:
    crossplane = pytest.importorskip("crossplane", reason="pip install crossplane==0.5.8")
    parsed = crossplane.parse(str(DEPLOY / "nginx.conf"), check_ctx=True, check_args=True)
    assert parsed["status"] == "ok", parsed["errors"]

    def walk(block: list[dict]) -> list[dict]:
        return [d for item in block for d in (item, *walk(item.get("block", [])))]

    return walk(parsed["config"][0]["parsed"])


def test_nginx_balances_over_the_replicas_port_and_streams() -> None:
    directives = nginx_directives()
    args = {d["directive"]: d["args"] for d in directives}
    server = next(d["args"] for d in directives if d["directive"] == "server" and d["args"])
    assert server[0] == f"steerserve:{env_file()['STEERSERVE_PORT']}" and "resolve" in server
    published = load(COMPOSE)["services"]["lb"]["ports"][0]
    assert re.fullmatch(rf"\d+:{args['listen'][0]}", published)
    assert args["proxy_buffering"] == ["off"], "SSE streams must not be buffered"
    assert "http_503" in args["proxy_next_upstream"]
