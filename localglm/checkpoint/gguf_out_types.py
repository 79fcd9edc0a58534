"""The tensor types `export-gguf --type` writes, apart from the writer (checkpoint/gguf.py imports
torch; `localglm --help` lists these choices without it)."""

from __future__ import annotations

import gguf
from gguf import GGMLQuantizationType as QT

# --type -> (the type of the big weights, the file type llama.cpp reads from general.file_type)
OUT_TYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
