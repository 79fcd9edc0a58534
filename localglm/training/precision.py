"""The precision training computes in: float32, or bfloat16 matmuls and attention under torch.autocast.

Why bfloat16: on a CPU with native bf16 dot products (AVX512-BF16, AMX) a step of the default model's
training takes 0.81x the float32 time (0.70x with `losses.py`'s chunked cross entropy;
benchmarks/bench_training_step.py), which with it brings training the model, its MTP block included,
inside its 45-minute budget on 2 cores. The master weights, the optimiser state, the norms, softmax and
the losses stay float32 (autocast's CPU policy). On a CPU without native bf16, pass float32.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def check_compute_dtype(name: str) -> None:
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)}")


def computing_in(name: str) -> ContextManager:
    """A context in which forward passes compute in `name` (float32: as they are)."""
    check_compute_dtype(name)
    dtype = COMPUTE_DTYPES[name]
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)
