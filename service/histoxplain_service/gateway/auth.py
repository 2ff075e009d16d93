"""Who is calling: static API tokens (stored as SHA-256 hashes) and bearer JWTs (JWKS-verified).

Both arrive as ``authorization: Bearer <credential>``. A credential shaped like a JWT (three
dot-separated parts) goes to :class:`JwtVerifier` when one is configured, anything else to
:class:`StaticTokens`. Every refusal raises :class:`AuthenticationFailed` whose reason is for
the gateway log only: the caller learns nothing about which check failed (signature, expiry,
issuer...), and no token ever reaches a log line or a message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt

from histoxplain_model.errors import DependencyUnavailable, InvalidRequest
from histoxplain_service.config import GatewaySettings
from histoxplain_service.gateway.reloading import ReloadingFiles
from histoxplain_service.gateway.roles import ROLES, Principal, roles_from
from histoxplain_service.gateway.security import is_loopback

__all__ = ["AuthenticationFailed", "Authenticator", "JwtVerifier", "StaticTokens", "build_authenticator"]

logger = logging.getLogger(__name__)

#: Asymmetric algorithms only: with a shared secret (HS256) anyone able to verify could also sign.
JWT_ALGORITHMS = ("RS256", "ES256")
#: How often the token and JWKS files are checked for changes (seconds).
RELOAD_CHECK_S = 1.0
Metadata = Sequence[tuple[str, str | bytes]]


class AuthenticationFailed(Exception):
    """A missing or bad credential; ``str(error)`` is the reason for the log, never for the caller."""


@dataclass(frozen=True)
class _TokenEntry:
    digest: bytes
    role: str
    principal: str


def parse_token_hashes(text: str, source: Path) -> tuple[_TokenEntry, ...]:
    """Parse ``<sha256 hex> <role> <principal name>`` lines; ``#`` starts a comment.

    Raises:
        InvalidRequest: a malformed line (the message gives the file and line number, never the
            line itself) or a file without any token.
    """
    entries: list[_TokenEntry] = []
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(maxsplit=2)
        where = f"{source} line {number}"
        if len(fields) != 3:
            raise InvalidRequest(f"{where}: expected '<sha256 hex> <role> <principal>'; fix HISTOXPLAIN_AUTH_TOKENS_FILE")
        digest_hex, role, principal = fields
        try:
            digest = bytes.fromhex(digest_hex)
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            raise InvalidRequest(
                f"{where}: the first field must be the SHA-256 of the token in hex (64 characters), never "
                "the token itself (printf %s \"$TOKEN\" | sha256sum); fix HISTOXPLAIN_AUTH_TOKENS_FILE"
            )
        if role not in ROLES:
            raise InvalidRequest(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if digest in seen:
            raise InvalidRequest(f"{where}: the same token hash appears twice; keep one line per token")
        seen.add(digest)
        entries.append(_TokenEntry(digest, role, principal.strip()))
    if not entries:
        raise InvalidRequest(f"{source} holds no token hashes; add one or unset HISTOXPLAIN_AUTH_TOKENS_FILE")
    return tuple(entries)


def _read_text(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"cannot read {path} ({type(error).__name__}); fix {setting}") from None


class StaticTokens:
    """API tokens checked against their SHA-256 hashes in a file (re-read when it changes)."""

    mechanism = "token"

    def __init__(self, path: Path, check_interval_s: float = RELOAD_CHECK_S) -> None:
        self._entries = ReloadingFiles(
            [path],
            lambda: parse_token_hashes(_read_text(path, "HISTOXPLAIN_AUTH_TOKENS_FILE"), path),
            f"token hashes {path} (HISTOXPLAIN_AUTH_TOKENS_FILE)",
            check_interval_s,
        )
        self._entries.load_now()

    def verify(self, token: str) -> Principal:
        """The principal whose hash matches ``token``. Every entry is compared in constant time
        (no early exit), so timing does not tell how close a guess came or where it matched."""
        presented = hashlib.sha256(token.encode("utf-8")).digest()
        match: _TokenEntry | None = None
        for entry in self._entries.get():
            if hmac.compare_digest(entry.digest, presented):
                match = entry
        if match is None:
            raise AuthenticationFailed("unknown API token")
        return Principal(match.principal, frozenset({match.role}), self.mechanism)


class SigningKeys(Protocol):
    """Where JWT verification keys come from: a JWKS file or an identity provider's URL."""

    blocking: bool

    def key_for(self, key_id: str | None) -> jwt.PyJWK: ...


def _key_set(text: str, source: str) -> jwt.PyJWKSet:
    try:
        document = json.loads(text)
        signing = [key for key in document["keys"] if key.get("use", "sig") == "sig"]
        return jwt.PyJWKSet.from_dict({"keys": signing})
    except (ValueError, KeyError, TypeError, jwt.PyJWKError, jwt.PyJWKSetError):
        raise InvalidRequest(f"{source} is not a JWKS with signing keys; fix HISTOXPLAIN_JWT_JWKS") from None


class JwksFile:
    """Keys from a local JWKS file, re-read when it changes (key rotation)."""

    blocking = False

    def __init__(self, path: Path, check_interval_s: float = RELOAD_CHECK_S) -> None:
        self._keys = ReloadingFiles(
            [path], lambda: _key_set(_read_text(path, "HISTOXPLAIN_JWT_JWKS"), str(path)),
            f"JWKS {path} (HISTOXPLAIN_JWT_JWKS)", check_interval_s,
        )
        self._keys.load_now()

    def key_for(self, key_id: str | None) -> jwt.PyJWK:
        keys = self._keys.get().keys
        if key_id is None and len(keys) == 1:
            return keys[0]
        for key in keys:
            if key.key_id == key_id:
                return key
        raise AuthenticationFailed(f"no key {key_id!r} in the JWKS")


class JwksUrl:
    """Keys fetched from an identity provider (cached; refetched for an unknown key id)."""

    blocking = True

    def __init__(self, url: str) -> None:
        self._url = url
        self._client = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=300, timeout=5.0)

    def key_for(self, key_id: str | None) -> jwt.PyJWK:
        try:
            if key_id is None:
                return self._client.get_signing_keys()[0]
            return self._client.get_signing_key(key_id)
        except jwt.PyJWKClientConnectionError:
            logger.warning("JWKS %s could not be fetched", self._url)
            raise DependencyUnavailable(
                "the identity provider's keys (HISTOXPLAIN_JWT_JWKS) could not be fetched; retry later"
            ) from None
        except jwt.PyJWKClientError as error:
            raise AuthenticationFailed(f"signing key: {error}") from None


def signing_keys(source: str) -> SigningKeys:
    """A JWKS path, an ``https://`` URL, or an ``http://`` URL on loopback (a local sidecar)."""
    if not source.startswith(("https://", "http://")):
        return JwksFile(Path(source).expanduser())
    host = urlsplit(source).hostname or ""
    if source.startswith("http://") and not is_loopback(host):
        raise InvalidRequest(f"HISTOXPLAIN_JWT_JWKS={source} must use https:// (http:// only on loopback)")
    return JwksUrl(source)


class JwtVerifier:
    """Bearer JWTs: RS256/ES256 signature, issuer, audience and expiry; roles from a claim."""

    mechanism = "jwt"

    def __init__(self, keys: SigningKeys, issuer: str, audience: str, roles_claim: str, leeway_s: float) -> None:
        self._keys = keys
        self._issuer = issuer
        self._audience = audience
        self._roles_path = roles_claim.split(".")
        self._leeway_s = leeway_s
        self.blocking = keys.blocking

    def verify(self, token: str) -> Principal:
        try:
            key = self._keys.key_for(jwt.get_unverified_header(token).get("kid"))
            claims = jwt.decode(
                token, key=key, algorithms=list(JWT_ALGORITHMS), audience=self._audience, issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.PyJWTError as error:  # the reason goes to the log, never to the caller
            raise AuthenticationFailed(f"JWT refused: {type(error).__name__}: {error}") from None
        name = str(claims.get("preferred_username") or claims.get("sub") or claims.get("azp") or "unnamed")
        return Principal(name, self._roles(claims), self.mechanism)

    def _roles(self, claims: dict[str, Any]) -> frozenset[str]:
        value: Any = claims
        for part in self._roles_path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str):
            return roles_from(value.split())
        if isinstance(value, list):
            return roles_from(str(role) for role in value)
        return frozenset()


class Authenticator:
    """Turns a call's metadata into a :class:`Principal` with the configured verifiers."""

    def __init__(self, tokens: StaticTokens | None, jwts: JwtVerifier | None) -> None:
        self._tokens = tokens
        self._jwts = jwts
        #: True when verification may wait on the network (a JWKS URL): run it off the event loop.
        self.blocking = jwts is not None and jwts.blocking

    def authenticate(self, metadata: Metadata | None) -> Principal:
        credential = bearer_credential(metadata)
        if self._jwts is not None and credential.count(".") == 2:
            return self._jwts.verify(credential)
        if self._tokens is None:
            raise AuthenticationFailed("not a JWT, and no static tokens are configured")
        return self._tokens.verify(credential)


def bearer_credential(metadata: Metadata | None) -> str:
    """The credential of the one ``authorization: Bearer ...`` header."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if len(values) != 1:
        raise AuthenticationFailed(f"{len(values)} authorization headers (expected 1)")
    value = values[0].decode("latin-1") if isinstance(values[0], bytes) else values[0]
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise AuthenticationFailed("authorization is not 'Bearer <credential>'")
    return credential.strip()


def build_authenticator(settings: GatewaySettings) -> Authenticator | None:
    """The authenticator the settings ask for; None when authentication is off.

    Raises:
        InvalidRequest: unreadable or malformed files, or a JWKS without issuer and audience.
    """
    tokens = StaticTokens(settings.auth_tokens_file) if settings.auth_tokens_file is not None else None
    jwts = None
    if settings.jwt_jwks is not None:
        if settings.jwt_issuer is None or settings.jwt_audience is None:
            raise InvalidRequest(
                "HISTOXPLAIN_JWT_JWKS is set: also set HISTOXPLAIN_JWT_ISSUER and HISTOXPLAIN_JWT_AUDIENCE "
                "(tokens for another issuer or service must not be accepted)"
            )
        jwts = JwtVerifier(
            signing_keys(settings.jwt_jwks), settings.jwt_issuer, settings.jwt_audience,
            settings.jwt_roles_claim, settings.jwt_leeway_s,
        )
    if tokens is None and jwts is None:
        return None
    return Authenticator(tokens, jwts)
