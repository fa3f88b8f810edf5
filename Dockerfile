# modelhost: one image for GPU and CPU nodes.
#
#   docker build -t modelhost:0.1.0 .
#   docker run --gpus all --read-only --tmpfs /tmp -p 50051:50051 -p 127.0.0.1:9090:9090 \
#     -v modelhost-store:/var/lib/modelhost/store -v "$PWD/tokens:/etc/modelhost/tokens:ro" \
#     -e MODELHOST_TOKEN_FILE=/etc/modelhost/tokens/token \
#     -e MODELHOST_MANAGEMENT_TOKEN_FILE=/etc/modelhost/tokens/management-token \
#     -e MODELHOST_HEALTH_PORT=50052 \
#     modelhost:0.1.0
#
# (MODELHOST_HEALTH_PORT: health checks get a plaintext port of their own, which the
# HEALTHCHECK below asks; it need not be published.)
#
# The base brings Python, torch 2.14.1 and torchvision 0.29.1 built for CUDA 12.6 and cuDNN 9.
# On a node without a GPU the same image runs on the CPU (MODELHOST_DEVICE=auto).
# It runs with a read-only root file system: it writes only to the store volume and /tmp.
# tests/container/ builds this file and runs the image (read-only, no capabilities, two
# replicas on one store, rolling replacement); tests/test_deploy.py lints it with hadolint.
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime

# Stage 1: a virtual environment holding modelhost and the server dependencies.
FROM ${BASE_IMAGE} AS build
# Optional pip settings for this stage only, e.g. behind a proxy or with a private index:
#   docker build --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt ...
# Unset by default; nothing of them reaches the final image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ENV VIRTUAL_ENV=/opt/modelhost \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# --system-site-packages: the environment uses the base image's torch and torchvision (several
# GB), so pip adds only what is missing (grpcio, protobuf, safetensors, ...).
RUN python -m venv --system-site-packages "$VIRTUAL_ENV"
COPY pyproject.toml README.md ./
COPY client ./client
COPY server ./server
RUN "$VIRTUAL_ENV/bin/pip" install --no-cache-dir '.[server]'

# Stage 2: the base image plus that environment; no sources, no build tools.
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="modelhost" \
      org.opencontainers.image.description="gRPC service that stores PyTorch checkpoints and serves the models built from them" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed non-root uid (Kubernetes' runAsNonRoot can check it); group 0 so that platforms
# running containers under an arbitrary uid in group 0 (OpenShift) can write the store too.
RUN useradd --no-log-init --system --uid 10001 --gid 0 --create-home --home-dir /home/modelhost modelhost \
    && mkdir -p /var/lib/modelhost/store \
    && chown -R 10001:0 /var/lib/modelhost \
    && chmod -R g=u /var/lib/modelhost

COPY --from=build /opt/modelhost /opt/modelhost

# Configuration: every `modelhost serve` flag is also a MODELHOST_<NAME> variable
# (`docker run modelhost:0.1.0 serve --help` lists them); override any with -e.
#
# MODELHOST_HOST=0.0.0.0 binds every interface, which the server accepts only with
# protection: the operator supplies tokens as files (MODELHOST_TOKEN_FILE for inference,
# MODELHOST_MANAGEMENT_TOKEN_FILE for uploads and loads; mount them read-only, e.g. from a
# Kubernetes Secret) or TLS. MODELHOST_INSECURE is deliberately not set in this image.
#
# MALLOC_ARENA_MAX=2: glibc keeps a malloc arena per thread; with load, batcher and gRPC
# threads coming and going on every hot swap, resident memory crept up ~1 MB per swap in
# bench/soak.py. Two arenas kept it flat.
#
# MODELHOST_METRICS_HOST=0.0.0.0: /metrics has its own bind address (loopback by default);
# inside a container it must listen on every interface to be reachable at all. Whether it is
# reachable from outside is then your choice of `-p 9090:9090` (or none).
#
# MODELHOST_RESTORE=true: on start the server loads again the models it hosted before,
# from the store, so a restarted container serves the same models without a caller
# replaying LoadModel. The store is a volume: mount a named volume or shared storage there.
#
# HOME=/tmp: libraries that cache in the home folder (Triton kernels in ~/.triton, torch
# hub in ~/.cache) write to /tmp, the one writable place besides the store when the root
# file system is read-only (docker run --read-only --tmpfs /tmp, or Kubernetes'
# readOnlyRootFilesystem with an emptyDir on /tmp).
ENV VIRTUAL_ENV=/opt/modelhost \
    HOME=/tmp \
    PATH=/opt/modelhost/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MALLOC_ARENA_MAX=2 \
    MODELHOST_HOST=0.0.0.0 \
    MODELHOST_PORT=50051 \
    MODELHOST_METRICS_PORT=9090 \
    MODELHOST_METRICS_HOST=0.0.0.0 \
    MODELHOST_STORE=/var/lib/modelhost/store \
    MODELHOST_DEVICE=auto \
    MODELHOST_RESTORE=true \
    MODELHOST_LOG_LEVEL=info

VOLUME ["/var/lib/modelhost/store"]
# gRPC (modelhost.v1.ModelHost, the Open Inference Protocol, health, reflection) and metrics.
EXPOSE 50051 9090
USER 10001:0
WORKDIR /home/modelhost

# For `docker run` and compose; Kubernetes uses its own gRPC probes instead. Like the
# Deployment's readiness probe it asks for the modelhost.v1.ModelHost service: healthy once
# the models are restored and calls are taken; the check fails while draining (SIGTERM).
# `modelhost health --local` asks this container's server, plaintext and without a token:
# on the probe port (MODELHOST_HEALTH_PORT) when it is set, else on MODELHOST_PORT (where
# health is open when there is no probe port). With TLS on the main port, set
# MODELHOST_HEALTH_PORT (the probe port is always plaintext) or run with --no-healthcheck.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["modelhost", "health", "--local", "--service", "modelhost.v1.ModelHost", "--timeout", "5"]

# SIGTERM (docker stop, Kubernetes) drains calls in flight for MODELHOST_GRACE_SECONDS.
ENTRYPOINT ["modelhost"]
CMD ["serve"]
