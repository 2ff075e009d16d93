"""Shared test set-up: one torch thread (2-core machines), no network, real sample images."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded

import pytest


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # the client SDK's tests run without torch
        return
    torch.set_num_threads(1)
