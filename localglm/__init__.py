"""localglm: run GLM-family mixture-of-experts models on one machine.

    import localglm
    model = localglm.load("path/to/GLM-4.5-Air", device="cpu")
    for event in model.generate(messages=[{"role": "user", "content": "Hi"}]):
        ...
"""

from .config import ModelConfig
from .engine import Done, Model
from .errors import CheckpointError, ConfigError, LocalGLMError, TokenizerError
from .loader import load
from .sampling import SamplingParams
from .stats import GenerationStats
from .chat.stream_parser import ContentDelta, ThinkingDelta, ToolCall, ToolCallArgsDelta, ToolCallEnd, ToolCallStart

__version__ = "0.1.0"

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
