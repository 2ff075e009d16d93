"""Fixtures for the gateway's security tests: a certificate authority made on the spot and a
gateway running on port 0 in a background event loop (so that the synchronous SDK can call it).

Certificates and keys are generated with ``cryptography``; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from qdrant_client import QdrantClient

from histoxplain_model.results import ModelInfo
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.gateway.server import Gateway
from histoxplain_service.index.qdrant import QdrantEngine


class InfoBackend:
    """The scripted model backend of test_gateway_server.py, reduced to what these tests call."""

    def info(self) -> ModelInfo:
        return ModelInfo("tiny", "resnet18", 512, (224, 224), ("gradcam",), "scripted")

    def ready(self) -> bool:
        return True

    def embed(self, images: Any, timeout: float | None = None) -> Any:
        raise NotImplementedError

    def explain(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass(frozen=True)
class Authority:
    """A certificate authority: its name, key and self-signed certificate (PEM)."""

    name: str
    key: ec.EllipticCurvePrivateKey
    certificate: bytes


class Pki:
    """Makes CAs and leaf certificates under ``folder`` (EC P-256, valid for a day)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def authority(self, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._sign(name, key.public_key(), name, key, is_ca=True)
        (self.folder / f"{name}.pem").write_bytes(certificate)
        return Authority(name, key, certificate)

    def issue(self, authority: Authority, common_name: str, *, server: bool = True) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``common_name``; server ones name localhost and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = self._sign(common_name, key.public_key(), authority.name, authority.key, is_ca=False,
                                 server=server)
        return certificate, _pem_key(key)

    def write(self, name: str, content: bytes) -> Path:
        """Write ``content`` to ``name`` in one rename (as Kubernetes swaps a Secret volume)."""
        path = self.folder / name
        staging = path.with_name(name + ".new")
        staging.write_bytes(content)
        os.replace(staging, path)
        return path

    @staticmethod
    def _sign(subject: str, public_key: Any, issuer: str, issuer_key: Any, *, is_ca: bool, server: bool = True) -> bytes:
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )
        if not is_ca and server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(folder)


class RunningGateway:
    """A gateway on 127.0.0.1, port 0, served by an event loop in a background thread."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-gateway", daemon=True)
        self.qdrant = QdrantClient(":memory:")
        self.gateway: Gateway | None = None

    @property
    def port(self) -> int:
        assert self.gateway is not None
        return self.gateway.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RunningGateway:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        self.gateway = Gateway(self.settings, InfoBackend(), QdrantEngine(self.settings.core, self.qdrant))
        await self.gateway.start()

    def stop(self) -> None:
        if self.gateway is not None:
            asyncio.run_coroutine_threadsafe(self.gateway.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.qdrant.close()


def gateway_settings(tmp_path: Path, **changes: Any) -> GatewaySettings:
    """Loopback, port 0, embedded backend, fast health checks: the settings of
    test_gateway_server.py plus ``changes``."""
    return GatewaySettings(
        core=Settings(data_dir=tmp_path / "data"), port=0, backend="embedded",
        health_interval_s=0.05, grace_period_s=0.5, **changes,
    )


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., GatewaySettings]:
    """``make_settings(**changes)`` -> the settings :func:`gateway_settings` describes."""
    return lambda **changes: gateway_settings(tmp_path, **changes)


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    """``start_gateway(**settings_changes)`` -> a started :class:`RunningGateway`, stopped at teardown."""
    started: list[RunningGateway] = []

    def start(**changes: Any) -> RunningGateway:
        running = RunningGateway(gateway_settings(tmp_path, **changes))
        started.append(running)
        return running.start()

    yield start
    for running in started:
        running.stop()
