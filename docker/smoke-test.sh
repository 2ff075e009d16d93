#!/usr/bin/env bash
# Run the pod of docker/k8s/deployment.yaml with the built images as a podman pod and check it:
# probes, an SDK round trip over TLS from the host, TorchServe unreachable from outside the pod,
# and a draining stop of both containers (docker/smoke_test.py says exactly what). CI runs it
# after docker/build-images.sh. Needs the images, podman, and the venv (make venv) for the SDK.
#   docker/smoke-test.sh [--keep] [--image CONTAINER=IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/docker/containers.conf}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-.venv/bin/python}" docker/smoke_test.py "$@"
