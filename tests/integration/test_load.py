"""A bounded load test: 20 asyncio clients for about a minute against a gateway whose
explanation budget admits one SearchAndExplain at a time.

The driver is the project's own (``histoxplain_service.app.loadtest``). Every call must be
answered, or refused with RESOURCE_EXHAUSTED by admission control; each RPC of the mix must
have answered some calls. The figures are printed (``pytest -s``) and, when
``HISTOXPLAIN_LOAD_REPORT`` names a file, appended to it as one JSON line.
``HISTOXPLAIN_LOAD_SECONDS`` changes the duration (default 60).

The gateway runs in this process (embedded backend, Qdrant local mode), so the memory reported
is that of the gateway, the model and the clients together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from grpc_helpers import IndexedGateway, indexed_gateway
from histoxplain_service.app.loadtest import format_result, run_load
from test_gateway import SERVING, embedded_backend, tiles  # noqa: F401 -- module fixtures used here

pytestmark = pytest.mark.integration

INDEX = "load"
CLIENTS = 20
LOAD_SECONDS = float(os.environ.get("HISTOXPLAIN_LOAD_SECONDS", "60"))
#: Grad-CAM at k=3 on both sides costs 6 units (gateway/admission.py): one SearchAndExplain at
#: a time, the others refused at once with RESOURCE_EXHAUSTED.
MAX_EXPLAIN_COST = 6


@pytest.fixture(scope="module")
def served(
    embedded_backend: Any, tiles: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory  # noqa: F811
) -> Iterator[IndexedGateway]:
    with indexed_gateway(
        tmp_path_factory.mktemp("load"), embedded_backend, tiles, INDEX, max_explain_cost=MAX_EXPLAIN_COST
    ) as gateway:
        yield gateway


@pytest.mark.slow
def test_twenty_clients_are_answered_or_told_to_retry(served: IndexedGateway, tiles: dict[str, bytes]) -> None:  # noqa: F811
    result = run_load(
        served.gateway.target, INDEX, list(tiles.values()), clients=CLIENTS, duration_s=LOAD_SECONDS, pid=os.getpid()
    )
    table = format_result(result, os.getpid())  # p50 / p95 / p99 per RPC, statuses, memory
    print("\n" + table)
    if report := os.environ.get("HISTOXPLAIN_LOAD_REPORT"):
        with open(report, "a", encoding="utf-8") as lines:
            lines.write(json.dumps({"test": "test_load", **result.to_json()}) + "\n")

    assert result.failures == {}, table
    assert all(stats.ok > 0 for stats in result.rpcs.values()), table
    assert served.gateway.health() == SERVING


_CLI = """
import sys
from histoxplain_service.app.loadtest import main
status = main(sys.argv[1:])
print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "timm", "onnxruntime")))
sys.exit(status)
"""


def test_the_command_line_runs_without_torch(
    served: IndexedGateway, tiles: dict[str, bytes], tmp_path: Path  # noqa: F811
) -> None:
    """The command line (``loadtest.main``) in a fresh interpreter: a short run, its figures as
    JSON, and no model package imported (it must run from the torch-free gateway image)."""
    query = tmp_path / "query.png"
    query.write_bytes(tiles["ihc-0-1"])
    arguments = [
        "--target", served.gateway.target, "--index", INDEX, "--clients", "2", "--duration", "2",
        "--image", str(query), "--pid", str(os.getpid()), "--json",
    ]
    finished = subprocess.run(
        [sys.executable, "-c", _CLI, *arguments], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert finished.returncode == 0, finished.stderr
    figures, heavy = finished.stdout.strip().splitlines()
    assert heavy == "[]"
    result = json.loads(figures)
    assert set(result["statuses"]) <= {"OK", "RESOURCE_EXHAUSTED"} and result["requests"] > 0
    assert result["peak_rss_bytes"] >= result["max_sampled_rss_bytes"] > 0
