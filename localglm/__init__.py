"""localglm: run GLM-family mixture-of-experts models on one machine.

    import localglm
    model = localglm.load("path/to/GLM-4.5-Air", device="cpu")
    for event in model.generate(messages=[{"role": "user", "content": "Hi"}]):
        ...

The names below are imported on first use (PEP 562 `__getattr__`): `import localglm` does not import
torch, so commands that need no model (`--help`, `--version`, `plan`, `inspect`, `simulate`) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .threads import configure_waiting

configure_waiting()  # before anything imports torch: OpenMP reads its wait policy once, when it loads

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "load": ".loader",
    "Model": ".engine",
    "Done": ".engine",
    "ModelConfig": ".config",
    "SamplingParams": ".sampling",
    "GenerationStats": ".stats",
    "LocalGLMError": ".errors",
    "ConfigError": ".errors",
    "CheckpointError": ".errors",
    "TokenizerError": ".errors",
    "ContentDelta": ".chat.stream_parser",
    "ThinkingDelta": ".chat.stream_parser",
    "ToolCall": ".chat.stream_parser",
    "ToolCallStart": ".chat.stream_parser",
    "ToolCallArgsDelta": ".chat.stream_parser",
    "ToolCallEnd": ".chat.stream_parser",
}

__all__ = [
    "load",
    "Model",
    "ModelConfig",
    "SamplingParams",
    "GenerationStats",
    "Done",
    "ContentDelta",
    "ThinkingDelta",
    "ToolCall",
    "ToolCallStart",
    "ToolCallArgsDelta",
    "ToolCallEnd",
    "LocalGLMError",
    "ConfigError",
    "CheckpointError",
    "TokenizerError",
]

if TYPE_CHECKING:
    from .chat.stream_parser import ContentDelta, ThinkingDelta, ToolCall, ToolCallArgsDelta, ToolCallEnd, ToolCallStart
    from .config import ModelConfig
    from .engine import Done, Model
    from .errors import CheckpointError, ConfigError, LocalGLMError, TokenizerError
    from .loader import load
    from .sampling import SamplingParams
    from .stats import GenerationStats


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use, and keep the name (later lookups skip this)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'localglm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
