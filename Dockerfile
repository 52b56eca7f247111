# The service image. Default: the GPU image (onnxruntime-gpu with CUDA and cuDNN from pip, so any
# slim Python base works on a host with an NVIDIA driver). `--build-arg RUNTIME=cpu` builds the
# small CPU-only image with plain onnxruntime. `--build-arg BASE=...` swaps the base image.

# ---- builder: a virtual environment holding the service and its runtime ------------------------
ARG BASE=python:3.11-slim
FROM ${BASE} AS builder
ARG RUNTIME=gpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml changes.
COPY pyproject.toml README.md ./
COPY docker/runtime_requirements.py docker/
RUN python3 docker/runtime_requirements.py "$RUNTIME" > requirements.txt \
    && /opt/venv/bin/pip install --requirement requirements.txt
COPY model_contract/ model_contract/
COPY model_runtime/ model_runtime/
COPY service/ service/
COPY model_export/ model_export/
COPY vit_tools/ vit_tools/
RUN /opt/venv/bin/pip install --no-deps . \
    && /opt/venv/bin/python -c "import service.app"

# ---- runtime: the environment, the default model, nothing else ---------------------------------
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG RUNTIME=gpu
LABEL org.opencontainers.image.title="vit-inference" \
      org.opencontainers.image.description="ViT classifier over HTTP (/v1 and Open Inference Protocol v2), ${RUNTIME} runtime" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/venv /opt/venv
COPY models/shapes-vit.onnx /app/models/shapes-vit.onnx
WORKDIR /app
# Every setting is a VIT_* variable (service/settings.py); these are only the container's defaults.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIT_MODEL=/app/models/shapes-vit.onnx \
    VIT_HOST=0.0.0.0 \
    VIT_PORT=8000 \
    VIT_GRPC_PORT=8001 \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=4194304 \
    MALLOC_TRIM_THRESHOLD_=33554432
# glibc otherwise raises its mmap threshold after the first large free, so request bodies land
# in heaps it keeps. Bodies over 4 MiB are mapped on their own and given back when freed; the
# tensors and batches below that stay in the heap, where a lower threshold faulted their pages
# in for every request: 131072 cost 8% of the images/s at 16 clients (docs/RELIABILITY.md,
# "Memory budget").
# A numeric non-root user: Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8000 8001
# Ready, not just alive: healthy only once the model is loaded and warmed up. No curl needed.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('VIT_PORT', '8000'), timeout=2)"]
# Exec form: vit-serve is PID 1 and gets SIGTERM itself, so it drains within VIT_GRACEFUL_SHUTDOWN_S.
CMD ["vit-serve"]
