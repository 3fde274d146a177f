# syntax=docker/dockerfile:1
# Two images from one file:
#   --target services  encoder + decoder (torch, transformers, media decoding)
#   --target gateway   the REST gateway only (no torch)
#   --target decoder-vllm  the decoder with vLLM's CUDA build as its engine (compose.gpu.yaml; vLLM brings its own torch)
# Build stages hold the compilers; the final stages hold a venv, a non-root user, nothing else.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos protos
COPY mmserve mmserve
COPY services services
COPY gateway gateway
RUN python -m venv /opt/mmserve && /opt/mmserve/bin/pip install --no-cache-dir --upgrade pip

FROM build-base AS build-services
# CPU wheels of torch by default; pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 for CUDA.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN /opt/mmserve/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt '.[serve,tracing]'

FROM build-base AS build-decoder-vllm
COPY constraints-vllm.txt ./
COPY scripts/patch-vllm.py scripts/
RUN /opt/mmserve/bin/pip install --no-cache-dir '.[serve,vllm,tracing]' && /opt/mmserve/bin/python scripts/patch-vllm.py

FROM build-base AS build-gateway
RUN /opt/mmserve/bin/pip install --no-cache-dir -c constraints.txt '.[gateway,tracing]'

FROM python:${PYTHON_VERSION}-slim AS runtime-base
RUN useradd --create-home --uid 10001 mmserve
ENV PATH=/opt/mmserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MMSERVE_HOST=0.0.0.0 \
    MMSERVE_CACHE_DIR=/home/mmserve/.cache/mmserve \
    HF_HOME=/home/mmserve/.cache/huggingface
WORKDIR /home/mmserve

FROM runtime-base AS gateway
COPY --from=build-gateway /opt/mmserve /opt/mmserve
USER mmserve
EXPOSE 8000
CMD ["mmserve", "gateway"]

FROM runtime-base AS services
COPY --from=build-services /opt/mmserve /opt/mmserve
RUN mkdir -p /home/mmserve/.cache && chown mmserve:mmserve /home/mmserve/.cache
USER mmserve
EXPOSE 50051 50052 9090
CMD ["mmserve", "encoder"]

FROM runtime-base AS decoder-vllm
COPY --from=build-decoder-vllm /opt/mmserve /opt/mmserve
RUN mkdir -p /home/mmserve/.cache && chown mmserve:mmserve /home/mmserve/.cache
ENV MMSERVE_DECODER_ENGINE=vllm
USER mmserve
EXPOSE 50052 9090
CMD ["mmserve", "decoder"]
