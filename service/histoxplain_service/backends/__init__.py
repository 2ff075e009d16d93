"""Model backends: where embeddings and heatmaps are computed (in-process or TorchServe).

The CLI and the gateway depend only on :class:`ModelBackend`; :func:`create_backend` picks one.
"""

from __future__ import annotations

from histoxplain_service.backends.base import ModelBackend

__all__ = ["ModelBackend"]
