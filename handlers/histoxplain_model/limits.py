"""Hard limits on what one request may ask for, defined once (torch-free).

Settings may lower them (``HISTOXPLAIN_MAX_K``, ``HISTOXPLAIN_MAX_EXPLAIN_K``,
``HISTOXPLAIN_MAX_MESSAGE_MB``) but never raise them past these values: every layer (CLI,
gateway, domain, TorchServe handler) checks against the same numbers.
"""

from __future__ import annotations

__all__ = ["MAX_IMAGE_ID_CHARS", "MAX_K", "MAX_MESSAGE_BYTES", "MAX_N_SAMPLES"]

#: The most hits (tiles or images) one search returns; each explained hit costs a backward pass.
MAX_K = 100
#: The longest image id a caller may give (ids are SHA-256 hex by default: 64 characters).
MAX_IMAGE_ID_CHARS = 256
#: The most noisy copies one SmoothGrad request may ask for (cost grows linearly with n).
MAX_N_SAMPLES = 256
#: Default largest gRPC message, both directions (gateway and gateway -> TorchServe).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
