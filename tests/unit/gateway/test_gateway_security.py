"""Secure by default: a non-loopback gateway without TLS and authentication does not start
(unless explicitly allowed, loudly), reflection follows the address, and the new settings parse."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from qdrant_client import QdrantClient

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.config import _GATEWAY_VARIABLES, GatewaySettings, Settings
from histoxplain_service.gateway.security import is_loopback, reflection_enabled
from histoxplain_service.gateway.server import Gateway
from histoxplain_service.index.qdrant import QdrantEngine


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("gateway.hospital.example", False),
])
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _build(settings: GatewaySettings) -> Gateway:
    """Construct (not start) a gateway: the exposure check runs before anything is bound."""
    backend = SimpleNamespace(ready=lambda: True)  # never called: the gateway is not started
    qdrant = QdrantClient(":memory:")

    async def build() -> Gateway:
        return Gateway(settings, backend, QdrantEngine(settings.core, qdrant))  # type: ignore[arg-type]

    try:
        return asyncio.run(build())
    finally:
        qdrant.close()


@pytest.fixture
def credentials(pki: Any, tmp_path: Path) -> dict[str, Path]:
    certificate, key = pki.issue(pki.authority("ca"), "gateway")
    (tmp_path / "tokens").write_text(f"{hashlib.sha256(b'token').hexdigest()} admin ops\n")
    return {"tls_cert": pki.write("tls.crt", certificate), "tls_key": pki.write("tls.key", key),
            "auth_tokens_file": tmp_path / "tokens"}


@pytest.mark.parametrize(("provided", "missing"), [
    ((), "TLS (HISTOXPLAIN_TLS_CERT + HISTOXPLAIN_TLS_KEY) and authentication"),
    (("tls_cert", "tls_key"), "without authentication (HISTOXPLAIN_AUTH_TOKENS_FILE or HISTOXPLAIN_JWT_JWKS)"),
    (("auth_tokens_file",), "without TLS (HISTOXPLAIN_TLS_CERT + HISTOXPLAIN_TLS_KEY)"),
])
def test_non_loopback_without_tls_and_auth_refuses_to_start(
    make_settings: Callable[..., GatewaySettings], credentials: dict[str, Path], provided: tuple[str, ...], missing: str
) -> None:
    settings = make_settings(host="0.0.0.0", **{name: credentials[name] for name in provided})
    with pytest.raises(InvalidRequest) as refused:
        _build(settings)
    assert missing in str(refused.value)
    assert "HISTOXPLAIN_ALLOW_INSECURE_REMOTE=1" in str(refused.value)


def test_non_loopback_with_tls_and_auth_starts_without_reflection(
    make_settings: Callable[..., GatewaySettings], credentials: dict[str, Path]
) -> None:
    gateway = _build(make_settings(host="0.0.0.0", **credentials))
    assert gateway.credentials is not None and gateway.authenticator is not None
    assert not reflection_enabled(gateway.settings)


def test_allow_insecure_remote_starts_with_a_loud_warning(
    make_settings: Callable[..., GatewaySettings], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="histoxplain_service"):
        gateway = _build(make_settings(host="0.0.0.0", allow_insecure_remote=True))
    assert gateway.credentials is None and gateway.authenticator is None
    assert "HISTOXPLAIN_ALLOW_INSECURE_REMOTE=1" in caplog.text and "WITHOUT" in caplog.text


def test_loopback_without_tls_or_auth_still_starts(make_settings: Callable[..., GatewaySettings]) -> None:
    gateway = _build(make_settings())
    assert gateway.credentials is None and gateway.authenticator is None
    assert reflection_enabled(gateway.settings)


@pytest.mark.parametrize(("reflection", "answers"), [(None, True), (True, True), (False, False)])
def test_reflection_can_be_switched_off(
    start_gateway: Callable[..., Any], reflection: bool | None, answers: bool
) -> None:
    running = start_gateway(reflection=reflection)
    with grpc.insecure_channel(running.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        if answers:
            assert list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        else:
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_security_settings_are_read_from_the_environment() -> None:
    env = {
        "HISTOXPLAIN_HEALTH_PORT": "50052",
        "HISTOXPLAIN_TLS_CERT": "/etc/histoxplain/tls/tls.crt",
        "HISTOXPLAIN_TLS_KEY": "/etc/histoxplain/tls/tls.key",
        "HISTOXPLAIN_TLS_CLIENT_CA": "/etc/histoxplain/tls/ca.crt",
        "HISTOXPLAIN_AUTH_TOKENS_FILE": "/etc/histoxplain/auth/tokens",
        "HISTOXPLAIN_JWT_JWKS": "https://keycloak.example/realms/x/protocol/openid-connect/certs",
        "HISTOXPLAIN_JWT_ISSUER": "https://keycloak.example/realms/x",
        "HISTOXPLAIN_JWT_AUDIENCE": "histoxplain",
        "HISTOXPLAIN_JWT_ROLES_CLAIM": "resource_access.histoxplain.roles",
        "HISTOXPLAIN_JWT_LEEWAY_S": "10",
        "HISTOXPLAIN_REFLECTION": "off",
        "HISTOXPLAIN_ALLOW_INSECURE_REMOTE": "1",
    }
    settings = GatewaySettings.from_env(env, core=Settings())
    assert settings.health_port == 50052
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (
        Path("/etc/histoxplain/tls/tls.crt"), Path("/etc/histoxplain/tls/tls.key"), Path("/etc/histoxplain/tls/ca.crt"))
    assert settings.auth_tokens_file == Path("/etc/histoxplain/auth/tokens")
    assert settings.jwt_jwks == env["HISTOXPLAIN_JWT_JWKS"] and settings.jwt_audience == "histoxplain"
    assert (settings.jwt_roles_claim, settings.jwt_leeway_s) == ("resource_access.histoxplain.roles", 10.0)
    assert settings.reflection is False and settings.allow_insecure_remote is True
    defaults = GatewaySettings.from_env({}, core=Settings())
    assert defaults.reflection is None and defaults.allow_insecure_remote is False and defaults.health_port is None


@pytest.mark.parametrize(("variable", "value"), [
    ("HISTOXPLAIN_ALLOW_INSECURE_REMOTE", "sure"),
    ("HISTOXPLAIN_REFLECTION", "maybe"),
    ("HISTOXPLAIN_HEALTH_PORT", "70000"),
    ("HISTOXPLAIN_JWT_LEEWAY_S", "3600"),
])
def test_bad_security_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(InvalidRequest, match=variable):
        GatewaySettings.from_env({variable: value}, core=Settings())


def test_every_gateway_variable_is_in_the_serving_guide() -> None:
    guide = (Path(__file__).resolve().parents[3] / "docs" / "SERVING.md").read_text()
    missing = [var.env for var in _GATEWAY_VARIABLES if f"`{var.env}`" not in guide]
    assert missing == []
