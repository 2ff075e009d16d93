"""Fixtures that start real components. TorchServe starts once per session.

Fixtures for other test modules:

``torchserve_model_store`` (session) -> Path
    A temporary model store holding ``histoxplain.mar`` freshly built from the default preset
    ``efficientnet-lite0-imagenet`` (its real packaged weights) with ``histoxplain_service.backends.torchserve.mar``.
    Use it to start a TorchServe of your own (e.g. to stop it in a health test):
    ``TorchServeProcess(torchserve_model_store, tmp_path / "ts")``.

``torchserve`` (session) -> RunningTorchServe
    A running TorchServe on free loopback ports, token authorization on, with the model
    registered as ``histoxplain`` (batch size 4, max batch delay 50 ms) and a READY worker.
    Attributes: ``process`` (TorchServeProcess: ``grpc_target``, ``key_file``,
    ``management_url``, ``log_file``), ``model_name``, ``batch_size``, ``max_batch_delay_ms``,
    ``backend_config`` (TorchServeConfig for ``TorchServeBackend``) and ``env`` (the
    ``HISTOXPLAIN_TORCHSERVE_*`` variables for a gateway). Stopped after the session.

``torchserve_backend`` (session) -> TorchServeBackend connected to ``torchserve``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from histoxplain_service.backends.torchserve.mar import build_mar

if TYPE_CHECKING:  # imported lazily below: collecting tests must stay cheap
    from histoxplain_service.backends.torchserve.backend import TorchServeBackend, TorchServeConfig
    from histoxplain_service.backends.torchserve.process import TorchServeProcess

os.environ.setdefault("OMP_NUM_THREADS", "1")

TORCHSERVE_MODEL_NAME = "histoxplain"
TORCHSERVE_BATCH_SIZE = 4
TORCHSERVE_MAX_BATCH_DELAY_MS = 50


@dataclass(frozen=True)
class RunningTorchServe:
    """What the ``torchserve`` fixture yields."""

    process: TorchServeProcess
    model_name: str
    batch_size: int
    max_batch_delay_ms: int
    backend_config: TorchServeConfig

    @property
    def env(self) -> dict[str, str]:
        """Environment variables pointing a gateway (GatewaySettings.from_env) at this server."""
        return {
            "HISTOXPLAIN_BACKEND": "torchserve",
            "HISTOXPLAIN_TORCHSERVE_ADDRESS": self.process.grpc_target,
            "HISTOXPLAIN_TORCHSERVE_KEY_FILE": str(self.process.key_file),
            "HISTOXPLAIN_TORCHSERVE_MODEL": self.model_name,
        }


def require_java() -> None:
    """TorchServe runs on Java 17; .ci/run installs it, so its absence is a set-up error, not a skip."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.fail("TorchServe needs Java 17: apt-get install openjdk-17-jre-headless (.ci/run does this)")


@pytest.fixture(scope="session")
def torchserve_model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model-store")
    build_mar(store, model_name=TORCHSERVE_MODEL_NAME, check=False)
    return store


@pytest.fixture(scope="session")
def torchserve(torchserve_model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTorchServe]:
    require_java()
    from histoxplain_service.backends.torchserve.backend import TorchServeConfig
    from histoxplain_service.backends.torchserve.process import TorchServeProcess

    process = TorchServeProcess(torchserve_model_store, tmp_path_factory.mktemp("torchserve"))
    process.start()
    try:
        process.register_model(
            f"{TORCHSERVE_MODEL_NAME}.mar",
            TORCHSERVE_MODEL_NAME,
            batch_size=TORCHSERVE_BATCH_SIZE,
            max_batch_delay_ms=TORCHSERVE_MAX_BATCH_DELAY_MS,
        )
        yield RunningTorchServe(
            process=process,
            model_name=TORCHSERVE_MODEL_NAME,
            batch_size=TORCHSERVE_BATCH_SIZE,
            max_batch_delay_ms=TORCHSERVE_MAX_BATCH_DELAY_MS,
            backend_config=TorchServeConfig(
                target=process.grpc_target, model_name=TORCHSERVE_MODEL_NAME, key_file=process.key_file
            ),
        )
    finally:
        process.stop()


@pytest.fixture(scope="session")
def torchserve_backend(torchserve: RunningTorchServe) -> Iterator[TorchServeBackend]:
    from histoxplain_service.backends.torchserve.backend import TorchServeBackend

    backend = TorchServeBackend(torchserve.backend_config)
    try:
        yield backend
    finally:
        backend.close()
