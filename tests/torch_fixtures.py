"""Helpers shared by the PyTorch test modules: the training params, one thread per run."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from data_fixtures import TRAIN_WITH_REGULARISATION

# CPU convolutions are bit-exact only for a fixed thread count, and other jobs may share the 2
# CI cores: more threads than free cores make torch's CPU kernels spin and run many times
# slower. Every run here (the worker processes included) uses this one count.
THREADS = 1

TRAIN_CFG = {
    "seed": 0,
    "custom_models": {},
    "train": {**TRAIN_WITH_REGULARISATION, "epochs": 3},
}


def with_train(**changes) -> dict:
    """``TRAIN_CFG`` with ``changes`` to its ``train`` section."""
    return {**TRAIN_CFG, "train": {**TRAIN_CFG["train"], **changes}}


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on ``THREADS`` threads for the block, the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def fixed_threads() -> Iterator[None]:
    """Imported by a test module, every test of that module runs on ``THREADS`` threads."""
    with one_thread():
        yield
