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

import pytest

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


def _run_serve(tmp_path: Path, backend: str, startup_s: float, stop: signal.Signals = signal.SIGTERM) -> None:
    env = dict(os.environ, HISTOXPLAIN_DATA=str(tmp_path / "data"), HISTOXPLAIN_PORT="0",
               HISTOXPLAIN_BACKEND=backend, HISTOXPLAIN_HEALTH_INTERVAL_S="0.5", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "histoxplain_service.app.serve", "--batch-size", "1"]
    log = tmp_path / "serve.out"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + startup_s
        while "ready on" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "make serve did not come up: " + log.read_text()[-3000:]
            time.sleep(0.2)
        line = next(line for line in log.read_text().splitlines() if "ready on" in line)
        target = line.split("ready on ")[1].split()[0]
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
