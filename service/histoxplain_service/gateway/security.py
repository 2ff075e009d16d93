"""Secure by default: what the gateway may expose on which address.

On loopback (``make serve``, tests) only local processes can connect, so the gateway may run
without TLS or authentication. On any other address a gateway without both would hand patient
images to anyone on the network: it refuses to start unless
``HISTOXPLAIN_ALLOW_INSECURE_REMOTE=1`` says that is intended (a network that is secured
otherwise), and then says so loudly in the log. Reflection, which lists the whole API, follows
the same line: on by default only on loopback.
"""

from __future__ import annotations

import ipaddress
import logging

from histoxplain_model.errors import InvalidRequest
from histoxplain_service.config import GatewaySettings

__all__ = ["check_exposure", "is_loopback", "reflection_enabled"]

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``); False for
    ``0.0.0.0``, ``::`` and every other address or name (which may resolve anywhere)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: GatewaySettings, tls: bool, authentication: bool) -> None:
    """Refuse a non-loopback address without TLS and authentication, unless explicitly allowed.

    Raises:
        InvalidRequest: naming what is missing and the settings that turn it on.
    """
    if is_loopback(settings.host) or (tls and authentication):
        return
    missing = " and ".join(
        part for part, on in (("TLS (HISTOXPLAIN_TLS_CERT + HISTOXPLAIN_TLS_KEY)", tls),
                              ("authentication (HISTOXPLAIN_AUTH_TOKENS_FILE or HISTOXPLAIN_JWT_JWKS)",
                               authentication)) if not on
    )
    if not settings.allow_insecure_remote:
        raise InvalidRequest(
            f"refusing to serve on {settings.host} without {missing}: set them, bind to loopback "
            "(HISTOXPLAIN_HOST=127.0.0.1), or set HISTOXPLAIN_ALLOW_INSECURE_REMOTE=1 if the network "
            "is secured another way"
        )
    logger.warning(
        "HISTOXPLAIN_ALLOW_INSECURE_REMOTE=1: serving on %s WITHOUT %s; anyone who can reach this port can "
        "read and change the indexes", settings.host, missing,
    )


def reflection_enabled(settings: GatewaySettings) -> bool:
    """``HISTOXPLAIN_REFLECTION`` when set, else on only for a loopback address."""
    return settings.reflection if settings.reflection is not None else is_loopback(settings.host)
