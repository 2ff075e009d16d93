"""Server TLS and mutual TLS from PEM files, re-read when they change.

``grpc.dynamic_ssl_server_credentials`` asks a fetcher for the certificate configuration at
every new connection (it works with ``grpc.aio`` servers: the core calls it from its own
threads). :class:`CertificateFiles` answers ``None`` ("unchanged") until one of the files
changes, then the new configuration: connections already open keep the old certificate, the
next handshake presents the new one, and no restart is needed. The pair is checked before it
is used (the key must match the certificate), because during a rotation that replaces the
files one by one a mismatched pair would fail every handshake.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.config import GatewaySettings
from histoxplain_service.gateway.reloading import ReloadingFiles

__all__ = ["CertificateFiles", "server_credentials", "tls_enabled"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Pem:
    """What one reading of the files produced (the key stays out of reprs and logs)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    summary: str

    def __repr__(self) -> str:
        return f"_Pem({self.summary})"


def tls_enabled(settings: GatewaySettings) -> bool:
    """TLS is on when a certificate and its key are configured."""
    return settings.tls_cert is not None and settings.tls_key is not None


def check_tls_settings(settings: GatewaySettings) -> None:
    """Certificate and key come together; a client CA (mutual TLS) needs server TLS."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise InvalidRequest(
            "HISTOXPLAIN_TLS_CERT and HISTOXPLAIN_TLS_KEY must be set together (set both, or neither)"
        )
    if settings.tls_client_ca is not None and not tls_enabled(settings):
        raise InvalidRequest(
            "HISTOXPLAIN_TLS_CLIENT_CA (mutual TLS) needs server TLS: set HISTOXPLAIN_TLS_CERT and HISTOXPLAIN_TLS_KEY"
        )


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InvalidRequest(f"cannot read {path} ({error.strerror}); fix {setting}") from None


def _load_pem(cert_path: Path, key_path: Path, client_ca_path: Path | None) -> _Pem:
    """Read and cross-check the files. Raises InvalidRequest naming the setting to fix."""
    chain = _read(cert_path, "HISTOXPLAIN_TLS_CERT")
    key_pem = _read(key_path, "HISTOXPLAIN_TLS_KEY")
    try:
        certificate = x509.load_pem_x509_certificate(chain)
    except ValueError:
        raise InvalidRequest(f"{cert_path} holds no PEM certificate; fix HISTOXPLAIN_TLS_CERT") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # never echo the error: it may quote the key
        raise InvalidRequest(
            f"{key_path} holds no unencrypted PEM private key; fix HISTOXPLAIN_TLS_KEY"
        ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise InvalidRequest(
            f"the key in {key_path} does not belong to the certificate in {cert_path}; "
            "fix HISTOXPLAIN_TLS_KEY or HISTOXPLAIN_TLS_CERT"
        )
    client_ca = None
    if client_ca_path is not None:
        client_ca = _read(client_ca_path, "HISTOXPLAIN_TLS_CLIENT_CA")
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError:
            raise InvalidRequest(
                f"{client_ca_path} holds no PEM certificate; fix HISTOXPLAIN_TLS_CLIENT_CA"
            ) from None
    summary = (
        f"subject {certificate.subject.rfc4514_string()}, "
        f"valid until {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        + (", client certificates required" if client_ca is not None else "")
    )
    return _Pem(chain, key_pem, client_ca, summary)


class CertificateFiles:
    """The gateway's certificate, key and optional client CA, as grpc certificate configurations."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        paths = [cert, key] + ([client_ca] if client_ca is not None else [])
        self._files = ReloadingFiles(
            paths, lambda: _load_pem(cert, key, client_ca), "TLS certificate (HISTOXPLAIN_TLS_CERT / _KEY / _CLIENT_CA)"
        )
        self.require_client_certificate = client_ca is not None

    def initial(self) -> grpc.ServerCertificateConfiguration:
        """The configuration at start-up; raises InvalidRequest when the files are unusable."""
        pem = self._files.load_now()
        logger.info("TLS on: %s", pem.summary)
        return _configuration(pem)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher: None while the files are unchanged, else the new configuration."""
        pem, reloaded = self._files.current()
        if not reloaded:
            return None
        logger.info("TLS certificate rotated: %s", pem.summary)
        return _configuration(pem)


def _configuration(pem: _Pem) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(pem.private_key, pem.certificate_chain)], root_certificates=pem.client_ca
    )


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gateway port, or None when TLS is off (plaintext)."""
    check_tls_settings(settings)
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    return grpc.dynamic_ssl_server_credentials(
        files.initial(), files.fetch, require_client_authentication=files.require_client_certificate
    )
