"""What kind of checkpoint a path is (GGUF file, localglm quantized directory), from names alone:
no weights read and no torch imported, so `inspect` and `plan` start fast."""

from __future__ import annotations

from pathlib import Path

MANIFEST = "localglm_quant.json"  # a localglm quantized directory's manifest (checkpoint/quantized_dir.py)


def is_gguf_path(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()
