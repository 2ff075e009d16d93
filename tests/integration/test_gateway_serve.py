"""``make serve`` (python -m histoxplain_service.app.serve) as a real process: it comes up, answers
the SDK, refuses a second serve on its data folder without disturbing it, and on SIGTERM stops
everything it started (the gateway and TorchServe); SIGKILLed, it leaves no TorchServe behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import histoxplain_client as hc

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


SERVE = [sys.executable, "-m", "histoxplain_service.app.serve", "--batch-size", "1"]


def _serve_env(tmp_path: Path, backend: str) -> dict[str, str]:
    return dict(os.environ, HISTOXPLAIN_DATA=str(tmp_path / "data"), HISTOXPLAIN_PORT="0",
                HISTOXPLAIN_BACKEND=backend, HISTOXPLAIN_HEALTH_INTERVAL_S="0.5", OMP_NUM_THREADS="1")


def _start_serve(tmp_path: Path, backend: str, startup_s: float) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A running ``make serve``: its process, the gateway's ``host:port`` and its log file."""
    log = tmp_path / "serve.out"
    with log.open("w") as out:
        process = subprocess.Popen(SERVE, stdout=out, stderr=subprocess.STDOUT, env=_serve_env(tmp_path, backend))
    deadline = time.monotonic() + startup_s
    while "ready on" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail("make serve did not come up: " + log.read_text()[-3000:])
        time.sleep(0.2)
    line = next(line for line in log.read_text().splitlines() if "ready on" in line)
    return process, line.split("ready on ")[1].split()[0], log


def _run_serve(tmp_path: Path, backend: str, startup_s: float, stop: signal.Signals = signal.SIGTERM) -> None:
    env, command = _serve_env(tmp_path, backend), SERVE
    process, target, log = _start_serve(tmp_path, backend, startup_s)
    try:
        with hc.Client(target, timeout=60) as client:
            client.wait_until_ready(30)
            assert client.info().backend == backend
        started = _descendants(process.pid)
        if backend == "torchserve":
            assert started, "TorchServe should run as a child of make serve"
            key_file = tmp_path / "data" / "torchserve" / "key_file.json"
            keys = key_file.read_bytes()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert second.returncode == 3 and "another serve is running" in second.stderr, second.stderr[-2000:]
        with hc.Client(target, timeout=60) as client:  # the running one is untouched
            assert client.info().backend == backend
        if backend == "torchserve":
            assert key_file.read_bytes() == keys
        process.send_signal(stop)
        status = process.wait(90)
        if stop == signal.SIGTERM:
            assert status == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 60
        while [pid for pid in started if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in started if _alive(pid)], "processes started by make serve outlived it"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_make_serve_embedded_stops_on_sigterm(tmp_path: Path) -> None:
    _run_serve(tmp_path, "embedded", startup_s=120)


@pytest.mark.slow
def test_make_serve_with_torchserve_stops_everything_on_sigterm(tmp_path: Path) -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("TorchServe needs Java 17: apt-get install openjdk-17-jre-headless (.ci/run does this)")
    _run_serve(tmp_path, "torchserve", startup_s=400)


@pytest.mark.slow
def test_a_sigkilled_serve_leaves_no_torchserve_behind(tmp_path: Path) -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("TorchServe needs Java 17: apt-get install openjdk-17-jre-headless (.ci/run does this)")
    _run_serve(tmp_path, "torchserve", startup_s=400, stop=signal.SIGKILL)


def _java(pids: set[int]) -> int:
    """The TorchServe frontend (the Java process) among ``pids``."""
    for pid in pids:
        try:
            if (Path("/proc") / str(pid) / "comm").read_text().strip() == "java":
                return pid
        except OSError:
            continue
    raise AssertionError("no TorchServe frontend (java) under make serve")


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service="histoxplain.v1.RetrievalService")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


@pytest.mark.slow
def test_make_serve_restarts_a_torchserve_that_died(tmp_path: Path) -> None:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("TorchServe needs Java 17: apt-get install openjdk-17-jre-headless (.ci/run does this)")
    process, target, log = _start_serve(tmp_path, "torchserve", startup_s=400)
    tile = np.full((224, 224, 3), (180, 90, 160), dtype=np.uint8)
    try:
        with hc.Client(target, timeout=60, retry=hc.NO_RETRY) as client:
            client.wait_until_ready(30)
            started = time.monotonic()  # health turns SERVING at the first probe after the port opens
            while _health(target) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() - started < 60, "make serve never reported SERVING"
                time.sleep(0.2)
            java = _java(_descendants(process.pid))
            os.kill(java, signal.SIGKILL)
            killed = time.monotonic()
            statuses = []
            while not statuses or statuses[-1] != health_pb2.HealthCheckResponse.SERVING or len(set(statuses)) == 1:
                assert time.monotonic() - killed < 300, f"health did not recover: {statuses[-5:]}"
                statuses.append(_health(target))
                time.sleep(0.5)
            recovered = time.monotonic() - killed
            print(f"TorchServe killed: health back to SERVING after {recovered:.1f} s")
            assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses  # health followed the outage
            assert client.index_images("after", [hc.IndexImage(tile, image_id="t")]).images_indexed == 1
        text = log.read_text()
        assert "restarting it in" in text and "TorchServe restarted" in text, text[-3000:]
        assert java not in _descendants(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
