# jaxclf: one image for serving (`jaxclf serve`, the default command) and training (`jaxclf train`).
#
#   docker build -t jaxclf:cpu .                                   # CPU (the default)
#   docker build --build-arg JAX_VARIANT=cuda12 -t jaxclf:cuda12 . # NVIDIA GPUs (CUDA 12 wheels from PyPI)
#   docker build --build-arg JAX_VARIANT=tpu -t jaxclf:tpu .       # Cloud TPU VMs / GKE TPU node pools (libtpu)
#
# Runs as an unprivileged user and never writes to its root filesystem: the XLA compilation cache
# (/var/cache/jaxclf, shared by replicas so restarts skip compiling) and /tmp are volumes, so
# `docker run --read-only` and Kubernetes' readOnlyRootFilesystem work. See docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with jaxclf and the JAX variant -----------------------------------
FROM ${PYTHON_IMAGE} AS build
# cpu | cuda12 | cuda13 | tpu: the jax extra installed on top of jaxclf's own (CPU) jax dependency
ARG JAX_VARIANT=cpu
# The JAX release the image is built and tested with (the accelerator wheels must match it exactly).
ARG JAX_VERSION=0.10.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/jaxclf
ENV PATH=/opt/jaxclf/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jaxclf ./jaxclf
RUN case "$JAX_VARIANT" in \
        cpu) jax_requirement="jax==${JAX_VERSION}" ;; \
        cuda12|cuda13|tpu) jax_requirement="jax[${JAX_VARIANT}]==${JAX_VERSION}" ;; \
        *) echo "JAX_VARIANT must be cpu, cuda12, cuda13 or tpu, got '$JAX_VARIANT'" >&2; exit 2 ;; \
    esac \
    && pip install --no-cache-dir . "$jax_requirement" \
    && jaxclf --version

# --- runtime: the environment, the sample data, an unprivileged user ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG JAX_VARIANT=cpu
LABEL org.opencontainers.image.title="jaxclf" \
      org.opencontainers.image.description="Transformer text classifiers in JAX/Flax: jaxclf serve | jaxclf train" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.jaxclf.jax-variant="${JAX_VARIANT}"
RUN groupadd --system --gid 10001 jaxclf \
    && useradd --system --uid 10001 --gid jaxclf --home-dir /tmp --no-create-home --shell /usr/sbin/nologin jaxclf \
    && install -d -o jaxclf -g jaxclf -m 0755 /var/cache/jaxclf /registry /runs
COPY --from=build /opt/jaxclf /opt/jaxclf
WORKDIR /app
# The default training data (`jaxclf train` with no --train reads data/sample_texts.csv).
COPY data/sample_texts.csv ./data/
# Whatever writes caches or user files lands on a volume: XDG caches in /var/cache/jaxclf, HOME and
# matplotlib's config in /tmp; no .pyc writes at run time.
ENV PATH=/opt/jaxclf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/var/cache/jaxclf \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    JAXCLF_REGISTRY=/registry
VOLUME ["/var/cache/jaxclf", "/tmp"]
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers); readiness (every bucket compiled) is /ready, for load balancers.
# Python's standard library, because the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["jaxclf"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--registry", "/registry", "--model", "sentiment@production", \
     "--compilation-cache-dir", "/var/cache/jaxclf/xla"]
