# TorchServe 0.12 model server with the histoxplain handler and a freshly built .mar. Built by
# docker/build-images.sh (podman), which makes the base locally and passes the build arguments
# below; by hand, from the repository root, once it has made the bases:
#   podman build --pull=never --ignorefile docker/build.dockerignore \
#     -f docker/torchserve.Dockerfile -t histoxplain-torchserve:0.1.0 .
# It runs as a sidecar of the gateway (docker/k8s/deployment.yaml): every TorchServe listener
# stays on 127.0.0.1 and token authorization stays on; the gateway reads key_file.json from the
# shared working directory (/ts-run). Read-only root file system: it writes only to /ts-run and
# /tmp (logs, the unpacked archive, the workers' sockets).
ARG PYTHON_BASE=localhost/histoxplain-python:3.11-bookworm

FROM ${PYTHON_BASE} AS build
ARG PYTHON_DEB_VERSION=3.11.2-6+deb12u9
# Build-time only, never in the final stage: the build host's CA bundle comes as the build
# secret host-ca (mounted for one RUN, in no layer), PIP_EXTRA_INDEX_URL / PIP_TRUSTED_HOST
# optionally name a local wheel index (the CUDA wheels are several GB).
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    OMP_NUM_THREADS=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends "python3.11-venv=${PYTHON_DEB_VERSION}" \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# What the worker needs (docker/requirements-torchserve.txt: torch's CUDA build, timm, TorchServe),
# at the full freeze's versions; binary wheels only, so nothing is compiled. The archiver gets a
# venv of its own that stays in this stage.
COPY requirements.txt docker/requirements-build.txt docker/requirements-torchserve.txt ./
RUN --mount=type=secret,id=host-ca \
    if [ -s /run/secrets/host-ca ]; then export PIP_CERT=/run/secrets/host-ca; fi \
 && python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements-build.txt \
 && /opt/venv/bin/pip install --only-binary=:all: -c requirements.txt -c requirements-build.txt \
      -r requirements-torchserve.txt \
 && python3.11 -m venv /opt/archiver \
 && /opt/archiver/bin/pip install --only-binary=:all: -c requirements.txt torch-model-archiver
COPY pyproject.toml ./
COPY handlers/ handlers/
COPY service/ service/
COPY model_store/build_mar.py model_store/
# Triton (0.9 GB) is torch.compile's kernel compiler: the handler runs eagerly, on CPU and GPU
# alike, so it leaves with pip. The archive is built and checked (the encoder loads with its
# weights, without Triton) here, once.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && /opt/venv/bin/python -m pip uninstall -y triton \
 && PATH=/opt/archiver/bin:$PATH /opt/venv/bin/python model_store/build_mar.py --out /opt/model-store \
      --model-name histoxplain --batch-size 1 --max-batch-delay-ms 20 \
 && /opt/venv/bin/python -m pip uninstall -y pip

FROM ${PYTHON_BASE}
ARG JRE_VERSION=17.0.21.1+2-1~deb12u1
ARG TINI_VERSION=0.19.0-1+b3
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="histoxplain-torchserve" \
      org.opencontainers.image.description="TorchServe 0.12 with the histoxplain handler and model archive (CUDA-capable torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"

# The JRE's post-install script links its man page into /usr/share/man/man1, which the base
# leaves out (no documentation in the images).
RUN mkdir -p /usr/share/man/man1 \
 && apt-get update \
 && apt-get install -y --no-install-recommends "openjdk-17-jre-headless=${JRE_VERSION}" "tini=${TINI_VERSION}" \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/apt/* /var/log/dpkg.log \
    /usr/share/man/* \
 && groupadd --system --gid 10001 torchserve \
 && useradd --system --uid 10001 --gid torchserve --home-dir /ts-run --shell /usr/sbin/nologin torchserve \
 && mkdir -p /ts-run \
 && chown torchserve:torchserve /ts-run
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/model-store /opt/model-store
COPY service/histoxplain_service/backends/torchserve/config.properties /opt/torchserve/config.properties

ENV PATH=/opt/venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    LOG_LOCATION=/tmp/ts-logs \
    METRICS_LOCATION=/tmp/ts-logs \
    TMPDIR=/tmp
USER 10001:10001
# key_file.json is written to the working directory: share /ts-run with the gateway.
WORKDIR /ts-run
EXPOSE 7070
# Shutdown: TorchServe's launcher ignores SIGTERM as PID 1 (it handles only SIGINT, and dies of
# it without stopping Java). tini is PID 1 (it forwards signals and reaps the processes that the
# launcher leaves behind); the guard below it turns SIGTERM into SIGTERM for the launcher's whole
# process group (launcher, Java frontend, Python workers), waits until all have exited and SIGKILLs
# what is left after 15 s. It exits 0 after a stop it was asked for.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "python", "-m", "histoxplain_service.backends.torchserve.guard", "15", \
            "torchserve", "--foreground", "--ncs", "--ts-config", "/opt/torchserve/config.properties", \
            "--model-store", "/opt/model-store", "--models", "histoxplain=histoxplain.mar"]
