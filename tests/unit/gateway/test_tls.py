"""TLS, mutual TLS and certificate rotation of the gateway, through the SDK, with a CA and
certificates generated in the test; the health-only plaintext port; start-up checks."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histoxplain_client import AsyncClient, Client, RetryPolicy, Unavailable
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_model.errors import InvalidRequest
from histoxplain_service.gateway.tls import server_credentials

ONE_TRY = RetryPolicy(max_attempts=1)
# A channel of its own per client: grpc shares connections between channels with equal
# arguments, and these tests need each client to make its own handshake.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def client(port: int, **options: Any) -> Client:
    return Client(f"localhost:{port}", retry=ONE_TRY, timeout=10, channel_options=OWN_CONNECTION, **options)


def presented_common_name(port: int, ca_file: Path) -> str:
    """The subject CN of the certificate the gateway presents to a new connection."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
    return subject["commonName"]


@pytest.fixture
def server_files(pki: Any) -> dict[str, Any]:
    """A CA, and the gateway's certificate and key signed by it, written to files."""
    authority = pki.authority("hospital-ca")
    certificate, key = pki.issue(authority, "gateway-1")
    return {"ca": pki.folder / "hospital-ca.pem", "authority": authority,
            "tls_cert": pki.write("tls.crt", certificate), "tls_key": pki.write("tls.key", key)}


def test_tls_round_trip_with_the_sdk_and_plaintext_is_refused(
    start_gateway: Callable[..., Any], server_files: dict[str, Any]
) -> None:
    running = start_gateway(tls_cert=server_files["tls_cert"], tls_key=server_files["tls_key"])
    with client(running.port, root_certificates=server_files["ca"]) as sdk:
        assert sdk.info().preset == "tiny"
    with client(running.port) as plaintext, pytest.raises(Unavailable):
        plaintext.info()

    async def scenario() -> None:
        async with AsyncClient(f"localhost:{running.port}", root_certificates=server_files["ca"].read_bytes(),
                               retry=ONE_TRY, channel_options=OWN_CONNECTION) as sdk:
            assert (await sdk.list_indexes()) == []

    asyncio.run(scenario())


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca(
    start_gateway: Callable[..., Any], server_files: dict[str, Any], pki: Any
) -> None:
    clients_ca = pki.authority("clients-ca")
    running = start_gateway(tls_cert=server_files["tls_cert"], tls_key=server_files["tls_key"],
                            tls_client_ca=pki.folder / "clients-ca.pem")
    certificate, key = pki.issue(clients_ca, "scanner-7", server=False)
    good = {"root_certificates": server_files["ca"], "client_certificate": pki.write("client.pem", certificate),
            "client_key": pki.write("client-key.pem", key)}
    with client(running.port, **good) as sdk:
        assert sdk.info().preset == "tiny"
    with client(running.port, root_certificates=server_files["ca"]) as no_certificate, pytest.raises(Unavailable):
        no_certificate.info()
    stranger_certificate, stranger_key = pki.issue(pki.authority("elsewhere-ca"), "stranger", server=False)
    with client(running.port, root_certificates=server_files["ca"], client_certificate=stranger_certificate,
                client_key=stranger_key) as stranger, pytest.raises(Unavailable):
        stranger.info()

    async def scenario() -> None:
        async with AsyncClient(f"localhost:{running.port}", retry=ONE_TRY, channel_options=OWN_CONNECTION,
                               **good) as sdk:
            assert (await sdk.info()).preset == "tiny"

    asyncio.run(scenario())


def test_replaced_certificate_files_are_presented_to_the_next_connection(
    start_gateway: Callable[..., Any], server_files: dict[str, Any], pki: Any, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_gateway(tls_cert=server_files["tls_cert"], tls_key=server_files["tls_key"])
    assert presented_common_name(running.port, server_files["ca"]) == "gateway-1"
    with client(running.port, root_certificates=server_files["ca"]) as sdk:
        assert sdk.info().preset == "tiny"

    new_authority = pki.authority("hospital-ca-2026")
    certificate, key = pki.issue(new_authority, "gateway-2")
    pki.write("tls.key", key)
    pki.write("tls.crt", certificate)

    assert presented_common_name(running.port, pki.folder / "hospital-ca-2026.pem") == "gateway-2"
    with client(running.port, root_certificates=pki.folder / "hospital-ca-2026.pem") as sdk:
        assert sdk.info().preset == "tiny"
    with client(running.port, root_certificates=server_files["ca"]) as old_roots, pytest.raises(Unavailable):
        old_roots.info()

    # Half a rotation (a new certificate whose key has not arrived) keeps the last good pair.
    with caplog.at_level(logging.WARNING, logger="histoxplain_service"):
        pki.write("tls.crt", pki.issue(new_authority, "gateway-3")[0])
        assert presented_common_name(running.port, pki.folder / "hospital-ca-2026.pem") == "gateway-2"
    assert "could not be loaded" in caplog.text and "does not belong" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_health_only_port_is_plaintext_and_serves_nothing_else(
    start_gateway: Callable[..., Any], server_files: dict[str, Any]
) -> None:
    running = start_gateway(tls_cert=server_files["tls_cert"], tls_key=server_files["tls_key"], health_port=0)
    health_port = running.gateway.health_port
    assert health_port not in (None, 0, running.port)
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.RetrievalServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls_cert": "tls.crt"}, "HISTOXPLAIN_TLS_CERT and HISTOXPLAIN_TLS_KEY must be set together"),
        ({"tls_client_ca": "hospital-ca.pem"}, "HISTOXPLAIN_TLS_CLIENT_CA (mutual TLS) needs server TLS"),
        ({"tls_cert": "tls.crt", "tls_key": "other.key"}, "does not belong to the certificate"),
        ({"tls_cert": "tls.crt", "tls_key": "missing.key"}, "fix HISTOXPLAIN_TLS_KEY"),
        ({"tls_cert": "tls.key", "tls_key": "tls.key"}, "holds no PEM certificate; fix HISTOXPLAIN_TLS_CERT"),
        ({"tls_cert": "tls.crt", "tls_key": "tls.crt"}, "no unencrypted PEM private key; fix HISTOXPLAIN_TLS_KEY"),
        ({"tls_cert": "tls.crt", "tls_key": "tls.key", "tls_client_ca": "tls.key"}, "fix HISTOXPLAIN_TLS_CLIENT_CA"),
    ],
)
def test_unusable_certificate_settings_stop_the_start_naming_the_setting(
    make_settings: Callable[..., Any], server_files: dict[str, Any], pki: Any, changes: dict[str, str], message: str
) -> None:
    pki.write("other.key", pki.issue(server_files["authority"], "other")[1])
    settings = make_settings(**{field: pki.folder / name for field, name in changes.items()})
    with pytest.raises(InvalidRequest) as refused:
        server_credentials(settings)
    assert message in str(refused.value)
    assert "PRIVATE KEY" not in str(refused.value)
