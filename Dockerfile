# One image for the API (`dfc-audit serve`), the Ray head and the Ray workers (KubeRay starts `ray start`
# in it), and the screening CronJob (`dfc-audit screen --once`). See k8s/README.md.
#
# GPU build (default): CUDA runtime base, CUDA wheels of torch from PyPI.
#   docker build -t dfc-audit:0.1.0 .
# CPU-only build (laptops, kind/minikube, CI): plain Ubuntu of the same release and the CPU wheels of torch.
#   docker build -t dfc-audit:0.1.0-cpu \
#     --build-arg BASE=ubuntu:24.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# Both bases are Ubuntu 24.04, so the same apt packages and Python (3.12) serve both variants.
# No secrets, tokens or weights are baked in: HF_TOKEN and bucket credentials come from a Kubernetes
# Secret at run time, and models are fetched into HF_HOME (an emptyDir or volume) when an audit needs them.
ARG BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Ray must be the same version in every pod of a cluster (and match rayVersion in k8s/base/raycluster.yaml).
ARG RAY_VERSION=2.60.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# The base image tag pins the Ubuntu release; exact apt versions are not pinned because the Ubuntu archive
# drops superseded patch releases, which would break every rebuild after a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first from its index (CUDA or CPU build), so the project's `torch>=…` is already satisfied.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "ray[default]==${RAY_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dfc ./dfc
COPY workers ./workers
COPY service ./service
# A regular (not editable) install: the runtime stage copies only the virtual environment.
RUN pip install --no-cache-dir /src

FROM ${BASE} AS runtime
ARG RAY_VERSION=2.60.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# bash is what KubeRay runs `ray start` with; python3 is the interpreter the copied venv links to.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates bash \
    && rm -rf /var/lib/apt/lists/*
# uid 10001: above the distribution's own users (Ubuntu 24.04 already has uid 1000), matched by the
# pods' securityContext.runAsUser so mounted volumes get the right owner through fsGroup.
RUN useradd --uid 10001 --user-group --create-home --shell /bin/bash dfc
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/dfc \
    HF_HOME=/home/dfc/.cache/huggingface \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
LABEL org.opencontainers.image.title="dfc-audit" \
      org.opencontainers.image.description="Audit service: diffs two LLMs with Dedicated Feature Crosscoders" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.ray.version="${RAY_VERSION}"
USER 10001
WORKDIR /home/dfc
# API, Ray GCS, Ray dashboard / Jobs API, Ray client, Ray metrics.
EXPOSE 8000 6379 8265 10001 8080
# For `docker run` of the API; Kubernetes ignores HEALTHCHECK and uses the probes in k8s/ instead.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["dfc-audit"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
