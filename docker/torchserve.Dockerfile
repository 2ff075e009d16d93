# TorchServe 0.12 model server with the histoxplain handler and a freshly built .mar.
# Build from the repository root:
#   docker build -f docker/torchserve.Dockerfile -t histoxplain-torchserve:0.1.0 .
# It runs as a sidecar of the gateway (docker/k8s/deployment.yaml): every TorchServe listener
# stays on 127.0.0.1 and token authorization stays on; the gateway reads key_file.json from the
# shared working directory (/ts-run).
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.txt pyproject.toml ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements.txt
COPY handlers/ handlers/
COPY service/ service/
COPY model_store/ model_store/
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python model_store/build_mar.py --out /opt/model-store --model-name histoxplain --batch-size 1 --max-batch-delay-ms 20

FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 torchserve \
 && useradd --system --uid 10001 --gid torchserve --home-dir /ts-run --shell /usr/sbin/nologin torchserve \
 && mkdir -p /ts-run && chown torchserve:torchserve /ts-run
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/model-store /opt/model-store
COPY service/histoxplain_service/backends/torchserve/config.properties /opt/torchserve/config.properties

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1 \
    LOG_LOCATION=/tmp/ts-logs \
    METRICS_LOCATION=/tmp/ts-logs \
    TMPDIR=/tmp
USER 10001:10001
# key_file.json is written to the working directory: share /ts-run with the gateway.
WORKDIR /ts-run
EXPOSE 7070
# --foreground keeps TorchServe's launcher as PID 1 so SIGTERM stops the frontend and workers.
ENTRYPOINT ["torchserve", "--foreground", "--ncs", "--ts-config", "/opt/torchserve/config.properties", \
            "--model-store", "/opt/model-store", "--models", "histoxplain=histoxplain.mar"]
