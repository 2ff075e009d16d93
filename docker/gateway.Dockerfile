# histoxplain gRPC gateway. Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t histoxplain-gateway:0.1.0 .
# Runs as a non-root user; the gateway is PID 1 and drains in-flight calls on SIGTERM itself.
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# No torch: the gateway calls TorchServe for every model computation (requirements-gateway.txt;
# tests/integration/test_gateway_no_torch.py). Versions are the full freeze's (-c).
COPY requirements.txt requirements-gateway.txt pyproject.toml ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements.txt -r requirements-gateway.txt
COPY handlers/ handlers/
COPY service/ service/
COPY client/ client/
RUN /opt/venv/bin/pip install --no-deps . ./client

FROM python:3.11-slim-bookworm

# A fixed numeric uid so that runAsNonRoot can verify it; the data dir is the only writable path.
RUN groupadd --system --gid 10001 histoxplain \
 && useradd --system --uid 10001 --gid histoxplain --home-dir /data --shell /usr/sbin/nologin histoxplain \
 && mkdir -p /data && chown histoxplain:histoxplain /data
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    HISTOXPLAIN_HOST=0.0.0.0 \
    HISTOXPLAIN_PORT=50051 \
    HISTOXPLAIN_DATA=/data \
    HISTOXPLAIN_BACKEND=torchserve
USER 10001:10001
WORKDIR /data
# Secure by default: on 0.0.0.0 the gateway starts only with TLS (HISTOXPLAIN_TLS_CERT/_KEY) and
# authentication (HISTOXPLAIN_AUTH_TOKENS_FILE or HISTOXPLAIN_JWT_JWKS), as docker/k8s/ sets them
# (its API on 50443, health-only on 50051); docs/SERVING.md "Security".
EXPOSE 50051
# Exec form: python is PID 1 and gets SIGTERM directly (the server installs its own handlers).
ENTRYPOINT ["python", "-m", "histoxplain_service.gateway.server"]
