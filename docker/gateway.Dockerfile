# histoxplain gRPC gateway, without torch. Built by docker/build-images.sh (podman), which makes
# the base locally and passes the build arguments below; by hand, from the repository root, once
# it has made the bases:
#   podman build --pull=never --ignorefile docker/build.dockerignore \
#     -f docker/gateway.Dockerfile -t histoxplain-gateway:0.1.0 .
# Runs as uid 10001 on a read-only root file system (docker/k8s/deployment.yaml): it writes only
# to /data (HISTOXPLAIN_DATA) and /tmp. The gateway is PID 1 and drains in-flight calls on SIGTERM
# itself (its handlers are installed explicitly, so PID 1's default of ignoring signals does not
# apply): no init process is needed.
ARG PYTHON_BASE=localhost/histoxplain-python:3.11-bookworm

FROM ${PYTHON_BASE} AS build
ARG PYTHON_DEB_VERSION=3.11.2-6+deb12u9
# Build-time only, never in the final stage: the build host's CA bundle comes as the build
# secret host-ca (podman build --secret id=host-ca,src=...: mounted for one RUN, in no layer),
# PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST optionally name a local wheel index.
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN apt-get update \
 && apt-get install -y --no-install-recommends "python3.11-venv=${PYTHON_DEB_VERSION}" \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# No torch: the gateway calls TorchServe for every model computation (requirements-gateway.txt;
# tests/integration/test_gateway_no_torch.py). Versions are the full freeze's (-c); binary
# wheels only, so nothing is compiled.
COPY requirements.txt requirements-gateway.txt docker/requirements-build.txt ./
RUN --mount=type=secret,id=host-ca \
    if [ -s /run/secrets/host-ca ]; then export PIP_CERT=/run/secrets/host-ca; fi \
 && python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements-build.txt \
 && /opt/venv/bin/pip install --only-binary=:all: -c requirements.txt -r requirements-gateway.txt
COPY pyproject.toml ./
COPY handlers/ handlers/
COPY service/ service/
COPY client/ client/
# The project and the SDK without their dependencies (those would pull torch), then the build
# tools leave the venv: the runtime image installs nothing.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . ./client \
 && /opt/venv/bin/python -m pip uninstall -y setuptools wheel pip \
 && /opt/venv/bin/python -c "import histoxplain_service.gateway.server, histoxplain_client"

FROM ${PYTHON_BASE}
ARG CA_CERTIFICATES_VERSION=20250419~deb12u2
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="histoxplain-gateway" \
      org.opencontainers.image.description="histoxplain gRPC gateway (TorchServe backend, Qdrant); no torch" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

# ca-certificates: Debian's public CAs for JWKS (HISTOXPLAIN_JWT_JWKS) and a Qdrant server over
# TLS. A fixed numeric uid so that runAsNonRoot can verify it; /data is the only writable path.
RUN apt-get update \
 && apt-get install -y --no-install-recommends "ca-certificates=${CA_CERTIFICATES_VERSION}" \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/apt/* /var/log/dpkg.log \
 && groupadd --system --gid 10001 histoxplain \
 && useradd --system --uid 10001 --gid histoxplain --home-dir /data --shell /usr/sbin/nologin histoxplain \
 && mkdir -p /data \
 && chown histoxplain:histoxplain /data
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HISTOXPLAIN_HOST=0.0.0.0 \
    HISTOXPLAIN_PORT=50051 \
    HISTOXPLAIN_DATA=/data \
    HISTOXPLAIN_BACKEND=torchserve
USER 10001:10001
WORKDIR /data
# Secure by default: on 0.0.0.0 the gateway starts only with TLS (HISTOXPLAIN_TLS_CERT/_KEY) and
# authentication (HISTOXPLAIN_AUTH_TOKENS_FILE or HISTOXPLAIN_JWT_JWKS), as docker/k8s/ sets them
# (its API on 50443, health-only on 50051); docs/SERVING.md "Security".
EXPOSE 50051 50443
STOPSIGNAL SIGTERM
# Exec form: python is PID 1 and gets SIGTERM directly (the server installs its own handlers).
ENTRYPOINT ["python", "-m", "histoxplain_service.gateway.server"]
