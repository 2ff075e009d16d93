"""Authentication and roles: the token-hash file, JWT verification, the role table, and every
role against every RPC through a real gateway on port 0 (UNAUTHENTICATED vs PERMISSION_DENIED,
health without credentials), plus the SDK's static token and token provider."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from histoxplain_client import AsyncClient, Client, PermissionDenied, Unauthenticated
from histoxplain_client._proto.histoxplain.v1 import pacs_pb2
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2 as pb
from histoxplain_client._proto.histoxplain.v1 import retrieval_service_pb2_grpc as pb_grpc
from histoxplain_model.errors import InvalidRequest
from histoxplain_service.config import GatewaySettings, Settings
from histoxplain_service.gateway.auth import (
    AuthenticationFailed,
    JwksFile,
    JwtVerifier,
    StaticTokens,
    build_authenticator,
    parse_token_hashes,
)
from histoxplain_service.gateway.interceptors import UNAUTHENTICATED_MESSAGE
from histoxplain_service.gateway.roles import ROLES, RPC_ROLES, Principal, required_role

ISSUER = "https://keycloak.hospital.example/realms/pathology"
AUDIENCE = "histoxplain"
SERVICE = pb.DESCRIPTOR.services_by_name["RetrievalService"]
RPCS = [method.name for method in SERVICE.methods]
READER_RPCS = {"Search", "SearchAndExplain", "Explain", "DescribeIndex", "ListIndexes", "GetModelInfo", "ExplainDicomRegion"}


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Issuer:
    """An identity provider in miniature: an RSA and an EC signing key published as a JWKS file."""

    def __init__(self, folder: Path) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.jwks_path = folder / "jwks.json"
        self.publish([("rsa-1", self.rsa, "RS256"), ("ec-1", self.ec, "ES256")])

    def publish(self, keys: list[tuple[str, Any, str]]) -> None:
        documents = []
        for kid, key, algorithm in keys:
            codec = jwt.algorithms.RSAAlgorithm if algorithm == "RS256" else jwt.algorithms.ECAlgorithm
            document = codec.to_jwk(key.public_key(), as_dict=True)
            documents.append({**document, "kid": kid, "use": "sig", "alg": algorithm})
        staging = self.jwks_path.with_suffix(".new")
        staging.write_text(json.dumps({"keys": documents}))
        staging.replace(self.jwks_path)

    def token(self, roles: list[str] | None = ("reader",), *, kid: str = "rsa-1", key: Any = None,  # type: ignore[assignment]
              algorithm: str = "RS256", lifetime_s: float = 300, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "preferred_username": "dr.who",
                                   "iat": now, "exp": now + int(lifetime_s)}
        if roles is not None:
            payload["realm_access"] = {"roles": list(roles)}
        payload.update(claims)
        signing_key = key if key is not None else (self.rsa if algorithm == "RS256" else self.ec)
        return jwt.encode(payload, signing_key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    return Issuer(tmp_path_factory.mktemp("idp"))


@pytest.fixture
def verifier(issuer: Issuer) -> JwtVerifier:
    return JwtVerifier(JwksFile(issuer.jwks_path, 0.0), ISSUER, AUDIENCE, "realm_access.roles", leeway_s=0.0)


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    """One random API token per role, plus the token-hash file that admits them."""
    issued = {role: secrets.token_urlsafe(24) for role in ROLES}
    lines = ["# sha256(token)                                                   role    principal", ""]
    lines += [f"{sha256_hex(token)} {role} {role}-service  # issued for tests" for role, token in issued.items()]
    (tmp_path / "tokens").write_text("\n".join(lines) + "\n")
    return issued


# -- the token-hash file --------------------------------------------------------------------------


def test_token_file_lines_become_principals_and_only_the_hash_is_stored(tmp_path: Path, tokens: dict[str, str]) -> None:
    text = (tmp_path / "tokens").read_text()
    assert not any(token in text for token in tokens.values())
    entries = parse_token_hashes(text, tmp_path / "tokens")
    assert [(entry.role, entry.principal) for entry in entries] == [(role, f"{role}-service") for role in ROLES]
    static = StaticTokens(tmp_path / "tokens")
    assert static.verify(tokens["writer"]) == Principal("writer-service", frozenset({"writer"}), "token")
    with pytest.raises(AuthenticationFailed):
        static.verify(tokens["writer"] + "x")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{token} reader alice", "never the token itself"),
        ("{digest} reader", "expected '<sha256 hex> <role> <principal>'"),
        ("{digest} superuser alice", "role 'superuser' is not one of reader, writer, admin"),
        ("{digest} reader alice\n{digest} admin bob", "line 2: the same token hash appears twice"),
        ("# nothing but a comment", "holds no token hashes"),
    ],
)
def test_bad_token_files_are_refused_with_the_line_and_setting_and_no_secret(
    tmp_path: Path, line: str, message: str
) -> None:
    token = secrets.token_hex(32)  # 64 hex characters: looks like a digest but is not one we accept
    path = tmp_path / "tokens"
    path.write_text(line.format(token="plain-" + token, digest=sha256_hex(token)) + "\n")
    with pytest.raises(InvalidRequest) as refused:
        StaticTokens(path)
    assert message in str(refused.value)
    assert str(path) in str(refused.value)
    assert token not in str(refused.value)
    assert "HISTOXPLAIN_AUTH_TOKENS_FILE" in str(refused.value) or "role" in message or "twice" in message


def test_token_file_is_reread_when_replaced_and_a_broken_one_keeps_the_last(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    old, new = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    path.write_text(f"{sha256_hex(old)} reader alice\n")
    static = StaticTokens(path, check_interval_s=0.0)
    assert static.verify(old).name == "alice"
    staging = tmp_path / "tokens.new"
    staging.write_text(f"{sha256_hex(new)} admin bob\n")
    staging.replace(path)
    assert static.verify(new).roles == {"admin"}
    with pytest.raises(AuthenticationFailed):
        static.verify(old)
    staging.write_text("not a token line\n")
    staging.replace(path)
    assert static.verify(new).name == "bob"  # the broken file is ignored (and logged)


# -- JWTs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_valid_jwt_gives_the_principal_and_its_roles(issuer: Issuer, verifier: JwtVerifier, algorithm: str) -> None:
    kid = "rsa-1" if algorithm == "RS256" else "ec-1"
    principal = verifier.verify(issuer.token(["writer", "offline_access"], kid=kid, algorithm=algorithm))
    assert principal == Principal("dr.who", frozenset({"writer", "offline_access"}), "jwt")
    assert principal.has_role("reader") and principal.has_role("writer") and not principal.has_role("admin")


def _other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [
        (lambda issuer: issuer.token(lifetime_s=-60), "ExpiredSignatureError"),
        (lambda issuer: issuer.token(iss="https://evil.example/realms/x"), "InvalidIssuerError"),
        (lambda issuer: issuer.token(aud="another-service"), "InvalidAudienceError"),
        (lambda issuer: issuer.token(key=_other_rsa_key()), "InvalidSignatureError"),
        (lambda issuer: issuer.token(kid="unknown-kid"), "no key 'unknown-kid'"),
        (lambda issuer: issuer.token(kid="ec-1", key=issuer.rsa, algorithm="RS256"), "InvalidAlgorithmError"),
        (lambda issuer: jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}, "a-shared-secret-of-32-bytes-long!",
                                   algorithm="HS256", headers={"kid": "rsa-1"}), "InvalidAlgorithmError"),
        (lambda issuer: jwt.encode({"iss": ISSUER, "aud": AUDIENCE}, issuer.rsa, algorithm="RS256",
                                   headers={"kid": "rsa-1"}), "MissingRequiredClaimError"),
        (lambda issuer: "abc.def.ghi", "DecodeError"),
    ],
    ids=["expired", "wrong-issuer", "wrong-audience", "wrong-key", "unknown-kid", "key-algorithm-mismatch",
         "hs256-confusion", "no-expiry", "garbage"],
)
def test_bad_jwts_are_refused_with_the_reason_for_the_log(
    issuer: Issuer, verifier: JwtVerifier, make_token: Callable[[Issuer], str], reason: str
) -> None:
    with pytest.raises(AuthenticationFailed, match=reason):
        verifier.verify(make_token(issuer))


@pytest.mark.parametrize(("claims", "roles"), [
    ({}, frozenset()),  # no realm_access at all
    ({"realm_access": {"other": 1}}, frozenset()),
    ({"realm_access": {"roles": "reader writer"}}, frozenset({"reader", "writer"})),
])
def test_missing_or_odd_role_claims_give_a_principal_without_roles(
    issuer: Issuer, verifier: JwtVerifier, claims: dict[str, Any], roles: frozenset[str]
) -> None:
    principal = verifier.verify(issuer.token(None, **claims))
    assert principal.roles == roles
    assert principal.has_role("reader") is ("reader" in roles)


def test_roles_claim_is_a_configurable_dotted_path(issuer: Issuer) -> None:
    client_roles = JwtVerifier(JwksFile(issuer.jwks_path), ISSUER, AUDIENCE, "resource_access.histoxplain.roles", 0.0)
    token = issuer.token(["reader"], resource_access={"histoxplain": {"roles": ["admin"]}})
    assert client_roles.verify(token).roles == {"admin"}


def test_a_rotated_jwks_file_is_picked_up(issuer: Issuer, verifier: JwtVerifier) -> None:
    new_key = ec.generate_private_key(ec.SECP256R1())
    token = issuer.token(kid="ec-2", key=new_key, algorithm="ES256")
    with pytest.raises(AuthenticationFailed):
        verifier.verify(token)
    issuer.publish([("rsa-1", issuer.rsa, "RS256"), ("ec-1", issuer.ec, "ES256"), ("ec-2", new_key, "ES256")])
    try:
        assert verifier.verify(token).name == "dr.who"
    finally:
        issuer.publish([("rsa-1", issuer.rsa, "RS256"), ("ec-1", issuer.ec, "ES256")])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"jwt_jwks": "{jwks}"}, "also set HISTOXPLAIN_JWT_ISSUER and HISTOXPLAIN_JWT_AUDIENCE"),
        ({"jwt_jwks": "http://idp.example/certs", "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}, "must use https://"),
        ({"jwt_jwks": "{tokens}", "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}, "not a JWKS"),
        ({"auth_tokens_file": "{missing}"}, "fix HISTOXPLAIN_AUTH_TOKENS_FILE"),
    ],
)
def test_authentication_settings_that_cannot_work_are_refused(
    tmp_path: Path, issuer: Issuer, tokens: dict[str, str], changes: dict[str, str], message: str
) -> None:
    paths = {"jwks": str(issuer.jwks_path), "tokens": str(tmp_path / "tokens"), "missing": str(tmp_path / "nope")}
    values: dict[str, Any] = {key: value.format(**paths) for key, value in changes.items()}
    if "auth_tokens_file" in values:
        values["auth_tokens_file"] = Path(values["auth_tokens_file"])
    with pytest.raises(InvalidRequest, match=message):
        build_authenticator(GatewaySettings(core=Settings(), **values))


def test_authentication_is_off_without_tokens_or_jwks() -> None:
    assert build_authenticator(GatewaySettings(core=Settings())) is None


# -- the role table --------------------------------------------------------------------------------


def test_role_table_names_every_rpc_of_the_service_and_nothing_else() -> None:
    assert set(RPC_ROLES) == set(RPCS)
    assert {rpc for rpc, role in RPC_ROLES.items() if role == "reader"} == READER_RPCS
    assert {rpc for rpc, role in RPC_ROLES.items() if role == "writer"} == {"IndexImages", "DeleteImages", "IndexDicom"}
    assert required_role(f"/{SERVICE.full_name}/Search") == "reader"
    assert required_role(f"/{SERVICE.full_name}/NotYetInTheTable") == "admin"  # default deny


# -- every role against every RPC through a real gateway -------------------------------------------


def _call(channel: grpc.Channel, rpc: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """Call ``rpc`` with a minimal request; the status code it ends with (OK included)."""
    stub = pb_grpc.RetrievalServiceStub(channel)
    requests = {
        "Search": pb.SearchRequest(index="none"),
        "SearchAndExplain": pb.SearchAndExplainRequest(index="none"),
        "Explain": pb.ExplainRequest(),
        "DescribeIndex": pb.DescribeIndexRequest(index="none"),
        "ListIndexes": pb.ListIndexesRequest(),
        "GetModelInfo": pb.GetModelInfoRequest(),
        "DeleteImages": pb.DeleteImagesRequest(index="none", image_ids=["a"]),
        "IndexDicom": pacs_pb2.IndexDicomRequest(index="none", study_instance_uid="1.2.3"),
        "ExplainDicomRegion": pacs_pb2.ExplainDicomRegionRequest(index="none"),
    }
    try:
        if rpc == "IndexImages":
            stub.IndexImages(iter([pb.IndexImagesRequest()]), timeout=10, metadata=metadata)
        else:
            getattr(stub, rpc)(requests[rpc], timeout=10, metadata=metadata)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@pytest.fixture
def secured(start_gateway: Callable[..., Any], tmp_path: Path, tokens: dict[str, str], issuer: Issuer) -> Iterator[Any]:
    running = start_gateway(auth_tokens_file=tmp_path / "tokens", jwt_jwks=str(issuer.jwks_path), jwt_issuer=ISSUER,
                            jwt_audience=AUDIENCE, jwt_leeway_s=0.0)
    with grpc.insecure_channel(running.address) as channel:
        yield running, channel


@pytest.mark.parametrize("rpc", RPCS)
def test_each_role_against_each_rpc(secured: Any, tokens: dict[str, str], issuer: Issuer, rpc: str) -> None:
    _, channel = secured
    expected_allowed = {"reader": rpc in READER_RPCS, "writer": True, "admin": True}
    for role, token in tokens.items():
        code = _call(channel, rpc, (("authorization", f"Bearer {token}"),))
        assert (code not in AUTH_CODES) is expected_allowed[role], (role, code)
        if not expected_allowed[role]:
            assert code == grpc.StatusCode.PERMISSION_DENIED
    jwt_reader = _call(channel, rpc, (("authorization", f"Bearer {issuer.token(['reader'])}"),))
    assert (jwt_reader == grpc.StatusCode.PERMISSION_DENIED) is (rpc not in READER_RPCS)
    assert _call(channel, rpc, (("authorization", f"Bearer {issuer.token(None)}"),)) == grpc.StatusCode.PERMISSION_DENIED
    assert _call(channel, rpc, ()) == grpc.StatusCode.UNAUTHENTICATED


def test_storing_region_results_in_the_pacs_needs_the_writer_role(secured: Any, tokens: dict[str, str]) -> None:
    """ExplainDicomRegion is a reader's RPC, but store_results writes into the PACS: a reader is
    refused before anything runs; a writer passes the role check (this gateway has no PACS, so it
    then gets FAILED_PRECONDITION naming the setting)."""
    _, channel = secured
    stub = pb_grpc.RetrievalServiceStub(channel)
    request = pacs_pb2.ExplainDicomRegionRequest(
        index="none", study_instance_uid="1.2.3", series_instance_uid="1.2.4", k=1, store_results=True
    )
    request.region_px.width = request.region_px.height = 64
    codes = {}
    for role, token in tokens.items():
        with pytest.raises(grpc.RpcError) as caught:
            stub.ExplainDicomRegion(request, timeout=10, metadata=(("authorization", f"Bearer {token}"),))
        codes[role] = (caught.value.code(), caught.value.details())
    assert codes["reader"][0] == grpc.StatusCode.PERMISSION_DENIED and "store_results" in codes["reader"][1]
    for role in ("writer", "admin"):
        assert codes[role][0] == grpc.StatusCode.FAILED_PRECONDITION and "HISTOXPLAIN_DICOMWEB_URL" in codes[role][1]
    request.store_results = False  # without storing, a reader gets as far as the writer
    with pytest.raises(grpc.RpcError) as caught:
        stub.ExplainDicomRegion(request, timeout=10, metadata=(("authorization", f"Bearer {tokens['reader']}"),))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_every_bad_credential_gets_the_same_answer_and_the_log_has_the_reason(
    secured: Any, issuer: Issuer, caplog: pytest.LogCaptureFixture
) -> None:
    _, channel = secured
    stub = pb_grpc.RetrievalServiceStub(channel)
    bad = {
        "none": (),
        "unknown token": (("authorization", "Bearer not-a-known-token"),),
        "expired jwt": (("authorization", f"Bearer {issuer.token(lifetime_s=-60)}"),),
        "wrong audience": (("authorization", f"Bearer {issuer.token(aud='x')}"),),
        "not bearer": (("authorization", "Basic dXNlcjpwYXNz"),),
    }
    with caplog.at_level(logging.INFO, logger="histoxplain_service"):
        for name, metadata in bad.items():
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert refused.value.details() == UNAUTHENTICATED_MESSAGE, name
    assert "ExpiredSignatureError" in caplog.text and "InvalidAudienceError" in caplog.text
    assert "not-a-known-token" not in caplog.text and issuer.token(lifetime_s=-60)[:40] not in caplog.text


def test_permission_denied_names_the_rpc_and_role_not_the_credential(secured: Any, tokens: dict[str, str]) -> None:
    _, channel = secured
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.RetrievalServiceStub(channel).DeleteImages(
            pb.DeleteImagesRequest(index="x", image_ids=["a"]), timeout=10,
            metadata=(("authorization", f"Bearer {tokens['reader']}"),),
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "DeleteImages" in refused.value.details() and "'writer'" in refused.value.details()
    assert tokens["reader"] not in refused.value.details()


def test_health_answers_without_credentials_and_reflection_needs_them(secured: Any, tokens: dict[str, str]) -> None:
    _, channel = secured
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as refused:
        list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answers = list(reflection.ServerReflectionInfo(iter([request]), timeout=10,
                                                   metadata=(("authorization", f"Bearer {tokens['reader']}"),)))
    assert SERVICE.full_name in {service.name for service in answers[0].list_services_response.service}


def test_unknown_methods_do_not_reveal_themselves_without_credentials(secured: Any, tokens: dict[str, str]) -> None:
    _, channel = secured
    unknown = channel.unary_unary(f"/{SERVICE.full_name}/NoSuchRpc")
    with pytest.raises(grpc.RpcError) as anonymous:
        unknown(b"", timeout=10)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as known:
        unknown(b"", timeout=10, metadata=(("authorization", f"Bearer {tokens['admin']}"),))
    assert known.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture
def jwks_url(issuer: Issuer) -> Iterator[str]:
    """The issuer's JWKS served over HTTP on loopback, as an identity provider would serve it."""

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 -- the name http.server calls
            body = issuer.jwks_path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- http.server's signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/realms/pathology/protocol/openid-connect/certs"
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_jwks_from_a_url_and_an_unreachable_one(start_gateway: Callable[..., Any], issuer: Issuer, jwks_url: str) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/certs"
    metadata = (("authorization", f"Bearer {issuer.token(['reader'], kid='ec-1', algorithm='ES256')}"),)
    for url, expected in ((jwks_url, grpc.StatusCode.OK), (dead_url, grpc.StatusCode.UNAVAILABLE)):
        running = start_gateway(jwt_jwks=url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
        with grpc.insecure_channel(running.address) as channel:
            assert _call(channel, "GetModelInfo", metadata) == expected
            assert _call(channel, "GetModelInfo", ()) == grpc.StatusCode.UNAUTHENTICATED


# -- the SDK ---------------------------------------------------------------------------------------


def test_sdk_sends_a_static_token_or_asks_a_provider_before_every_call(
    secured: Any, tokens: dict[str, str], issuer: Issuer
) -> None:
    running, _ = secured
    with Client(running.address, token=tokens["reader"]) as client:
        assert client.info().preset == "tiny"
        with pytest.raises(PermissionDenied):
            client.delete("none", ["a"])
    with Client(running.address) as anonymous, pytest.raises(Unauthenticated):
        anonymous.info()
    issued: list[str] = []

    def fresh_jwt() -> str:  # a new short-lived token each time, as a refreshing provider would
        issued.append(issuer.token(["reader"], lifetime_s=60, jti=secrets.token_hex(4)))
        return issued[-1]

    with Client(running.address, token_provider=fresh_jwt) as client:
        client.info()
        client.list_indexes()
    assert len(set(issued)) == 2

    async def scenario() -> None:
        async with AsyncClient(running.address, token_provider=fresh_jwt) as client:
            assert (await client.info()).preset == "tiny"
        async with AsyncClient(running.address, token=tokens["writer"]) as client:
            assert (await client.list_indexes()) == []

    asyncio.run(scenario())
    assert len(issued) == 3


def test_sdk_refuses_ambiguous_or_malformed_tokens() -> None:
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", token="a", token_provider=lambda: "b")
    with pytest.raises(ValueError, match="single-line"):
        Client("127.0.0.1:1", token="a\nb")
    with pytest.raises(ValueError, match="pass both or neither"):
        Client("127.0.0.1:1", client_certificate=b"pem")
