"""The connection to a PACS over DICOMweb (URL, credentials, timeouts), and the one place its
failures become histoxplain errors.

Credentials
    HTTP Basic with ``HISTOXPLAIN_DICOMWEB_USER`` and a password from
    ``HISTOXPLAIN_DICOMWEB_PASSWORD_FILE`` (a mounted secret, read each time a connection opens,
    so a rotated secret is picked up) or ``HISTOXPLAIN_DICOMWEB_PASSWORD``. The password is kept
    out of ``repr`` and of every log line and message.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from histoxplain_model.errors import (
    DependencyUnavailable,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from histoxplain_service.config import Settings

__all__ = ["PacsConnection", "pacs_errors"]

log = logging.getLogger(__name__)

# dicomweb-client and highdicom log Study, Series and SOP Instance UIDs at INFO, wsidicom and
# urllib3 (URLs with UIDs in their path) at DEBUG: the keys of patient data, so their loggers are
# held at WARNING.
for _chatty in ("dicomweb_client", "highdicom", "wsidicom", "urllib3.connectionpool"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

_CREDENTIALS = "HISTOXPLAIN_DICOMWEB_USER and HISTOXPLAIN_DICOMWEB_PASSWORD_FILE (or HISTOXPLAIN_DICOMWEB_PASSWORD)"


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
        user: HTTP Basic user; ``None``: no authentication.
        password: that user's password (never logged).
        timeout_s: the timeout of one HTTP request.
    """

    url: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0

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
        return cls(settings.dicomweb_url, settings.dicomweb_user, password, settings.dicomweb_timeout_s)

    def session(self) -> requests.Session:
        """A requests session with the credentials and the timeout."""
        session = requests.Session()
        if self.user is not None:
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
