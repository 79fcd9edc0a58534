"""Shared fixtures: small random GLM checkpoints written by `localglm.tiny.make_tiny`, and `one_thread`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny

# The speculative depth policy's prices file (speculative_prices.py) off: one test's timings must not steer
# another's depths, nor land in the user's cache. Its own tests name a file of theirs.
os.environ["LOCALGLM_MTP_PRICES"] = "off"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model (bf16, GLM-4.5 chat template), shared by read-only tests."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model", TinySpec())


@pytest.fixture(scope="session")
def tiny_fp32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny32") / "model", TinySpec(dtype="float32"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test on one torch thread (then restore the count).

    Quantizing small tensors is overhead-bound: one thread is faster, and steady on a busy machine.
    Modules use it for every test with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
