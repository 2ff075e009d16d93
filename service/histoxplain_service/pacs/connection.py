"""The connection to a PACS over DICOMweb (URL, credentials, timeouts), and the one place its
failures become histoxplain errors.

Credentials
    HTTP Basic with ``HISTOXPLAIN_DICOMWEB_USER`` and a password from
    ``HISTOXPLAIN_DICOMWEB_PASSWORD_FILE`` (a mounted secret, read each time a connection opens,
    so a rotated secret is picked up) or ``HISTOXPLAIN_DICOMWEB_PASSWORD``; or an OAuth 2.0
    access token from ``HISTOXPLAIN_DICOMWEB_TOKEN_FILE``, sent as ``Authorization: Bearer`` (a
    PACS behind an identity provider: cloud DICOMweb services, hospital API gateways). The token
    file is written by whatever obtains and refreshes the token (a sidecar, a projected
    service-account token, a cron job): it is re-read whenever its modification time or size
    changes, so a refreshed token is used from the next request on. A token is sent only over
    ``https://`` or to a loopback address (over plain HTTP it could be copied off the network).
    Passwords and tokens are kept out of ``repr`` and of every log line and message.

Errors
    :func:`pacs_errors` maps what requests and dicomweb-client raise: an unreachable PACS or a
    timeout -> ``DependencyUnavailable`` naming ``HISTOXPLAIN_DICOMWEB_URL``; HTTP 401 / 403 ->
    ``PermissionDenied`` naming the credential settings; HTTP 404 -> ``NotFound`` (the caller
    says what was missing); any other HTTP error -> ``DependencyUnavailable``. Messages reach
    gateway clients and logs, so they name settings and fields, never a UID, a URL or a patient;
    the log gets the exception's class and the HTTP status only; the loggers of dicomweb-client,
    highdicom, wsidicom and urllib3, which would log UIDs, are held at WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import requests.auth
from requests.adapters import HTTPAdapter

from histoxplain_model.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from histoxplain_service.config import Settings

__all__ = ["BearerTokenFile", "PacsConnection", "pacs_errors"]

log = logging.getLogger(__name__)

# dicomweb-client and highdicom log Study, Series and SOP Instance UIDs at INFO, wsidicom and
# urllib3 (URLs with UIDs in their path) at DEBUG: the keys of patient data, so their loggers are
# held at WARNING.
for _chatty in ("dicomweb_client", "highdicom", "wsidicom", "urllib3.connectionpool"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

_CREDENTIALS = (
    "HISTOXPLAIN_DICOMWEB_USER and HISTOXPLAIN_DICOMWEB_PASSWORD_FILE (or HISTOXPLAIN_DICOMWEB_PASSWORD), "
    "or HISTOXPLAIN_DICOMWEB_TOKEN_FILE"
)
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class BearerTokenFile(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` with the token read from ``path``, again whenever the
    file's modification time or size changes (a refresher rewrote it). Safe to share between
    threads. The token is never logged or shown in ``repr``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._token = ""
        self.token()  # an unreadable or empty file fails now, at start, not on the first request

    def __repr__(self) -> str:
        return "BearerTokenFile(<token file>)"

    def token(self) -> str:
        """The current token (DependencyUnavailable: the file cannot be read or is empty)."""
        try:
            status = self.path.stat()
            seen = (status.st_mtime_ns, status.st_size)
            with self._lock:
                if seen != self._seen:
                    token = self.path.read_text().strip()
                    if not token or any(c.isspace() for c in token):
                        raise ValueError("not one token")
                    self._token, self._seen = token, seen
                return self._token
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("cannot read the DICOMweb token file: %s", type(exc).__name__)
            raise DependencyUnavailable(
                "cannot read an access token from the PACS token file (one token, no spaces); check "
                "HISTOXPLAIN_DICOMWEB_TOKEN_FILE"
            ) from None

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token()}"
        return request


class _TimeoutAdapter(HTTPAdapter):
    """Every request of the session gets ``timeout`` unless it brings its own (requests has no
    session-wide timeout, and wsidicom's calls pass none)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


@dataclass(frozen=True)
class PacsConnection:
    """Where the PACS's DICOMweb service is and how to authenticate to it.

    Attributes:
        url: the DICOMweb root (QIDO-RS, WADO-RS and STOW-RS), e.g. ``http://127.0.0.1:8042/dicom-web``.
        user: HTTP Basic user; ``None``: no HTTP Basic authentication.
        password: that user's password (never logged).
        timeout_s: the timeout of one HTTP request.
        token: an OAuth 2.0 bearer token file instead of the user and password (module docstring).
    """

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    token: BearerTokenFile | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> PacsConnection:
        """The PACS the settings name (the password file is read now).

        Raises:
            FailedPrecondition: no ``HISTOXPLAIN_DICOMWEB_URL``.
            InvalidRequest: both a password and a password file, or a password without a user.
            DependencyUnavailable: the password file cannot be read.
        """
        if not settings.dicomweb_url:
            raise FailedPrecondition("no PACS is configured; set HISTOXPLAIN_DICOMWEB_URL to its DICOMweb URL")
        password = settings.dicomweb_password
        if settings.dicomweb_password_file is not None:
            if password is not None:
                raise InvalidRequest(
                    "both HISTOXPLAIN_DICOMWEB_PASSWORD and HISTOXPLAIN_DICOMWEB_PASSWORD_FILE are set; keep one"
                )
            try:
                password = settings.dicomweb_password_file.read_text().strip()
            except OSError as exc:
                log.warning("cannot read the DICOMweb password file: %s", type(exc).__name__)
                raise DependencyUnavailable(
                    "cannot read the PACS password file; check HISTOXPLAIN_DICOMWEB_PASSWORD_FILE"
                ) from None
        if password is not None and not settings.dicomweb_user:
            raise InvalidRequest("a PACS password is set without a user; set HISTOXPLAIN_DICOMWEB_USER")
        token = None
        if settings.dicomweb_token_file is not None:
            if settings.dicomweb_user or password is not None:
                raise InvalidRequest(
                    "HISTOXPLAIN_DICOMWEB_TOKEN_FILE and a PACS user or password are both set; keep one way to authenticate"
                )
            url = urlsplit(settings.dicomweb_url)
            if url.scheme != "https" and url.hostname not in _LOOPBACK_HOSTS:
                raise InvalidRequest(
                    "HISTOXPLAIN_DICOMWEB_TOKEN_FILE needs an https:// HISTOXPLAIN_DICOMWEB_URL (or a loopback address): "
                    "a bearer token over plain HTTP can be copied off the network"
                )
            token = BearerTokenFile(settings.dicomweb_token_file)
        return cls(settings.dicomweb_url, settings.dicomweb_user, password, settings.dicomweb_timeout_s, token)

    def session(self) -> requests.Session:
        """A requests session with the credentials and the timeout."""
        session = requests.Session()
        if self.token is not None:
            session.auth = self.token
        elif self.user is not None:
            session.auth = (self.user, self.password or "")
        adapter = _TimeoutAdapter(self.timeout_s)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def client(self, session: requests.Session | None = None) -> Any:
        """A ``dicomweb_client.DICOMwebClient`` on ``session`` (default: a new one)."""
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(self.url, session=session or self.session(), timeout=self.timeout_s)
        # dicomweb-client retries 408/429/503/504 five times from 1 s up: a viewer cannot wait that long.
        client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=100)
        return client


@contextlib.contextmanager
def pacs_errors(action: str, not_found: str | None = None) -> Iterator[None]:
    """Map PACS failures while doing ``action`` (e.g. ``"reading a slide"``) to histoxplain errors.

    ``not_found``: the message of HTTP 404 (``None``: 404 is a PACS failure like any other).
    """
    try:
        yield
    except (requests.ConnectionError, requests.Timeout) as exc:
        log.warning("the PACS is unreachable while %s (%s)", action, type(exc).__name__)
        raise DependencyUnavailable(
            f"the PACS is unreachable while {action}; check HISTOXPLAIN_DICOMWEB_URL and that the PACS is running"
        ) from None
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        log.warning("the PACS answered HTTP %s while %s", status, action)
        if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
            raise PermissionDenied(
                f"the PACS refused histoxplain's credentials (HTTP {status}) while {action}; check {_CREDENTIALS}"
            ) from None
        if status == HTTPStatus.NOT_FOUND and not_found is not None:
            raise NotFound(not_found) from None
        raise DependencyUnavailable(
            f"the PACS answered HTTP {status} while {action}; check the PACS log"
        ) from None
