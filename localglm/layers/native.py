"""The native CPU kernels as the layers see them: looked up once, None where they cannot be built."""

from __future__ import annotations

from functools import cache

from quant.native import NativeLib, native_lib


@cache
def native() -> NativeLib | None:
    """The native CPU kernels, looked up once (a hot path: ~50 norms and 24 RoPE calls a token)."""
    return native_lib()
