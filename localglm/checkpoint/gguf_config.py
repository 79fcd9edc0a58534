"""The model a GGUF's metadata describes: its architecture and config, read from the header alone.
Apart from checkpoint/gguf.py (tensors, tokenizer, export), which imports torch: `inspect` and `plan`
on a GGUF start without it."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from ..models import arch_for_gguf
from ..models.arch import Arch
from .gguf_file import GGUFModelFiles


def arch_of_gguf(files: GGUFModelFiles) -> Arch:
    """The registry's architecture for the file's `general.architecture` (one-line error otherwise)."""
    return arch_for_gguf(files.metadata.get("general.architecture"), str(files.where))


def config_from_gguf(files: GGUFModelFiles) -> ModelConfig:
    """The ModelConfig GGUF metadata describes (llama.cpp's defaults where a key is optional)."""
    return ModelConfig.from_dict(hf_config_from_gguf(files), source=f"{files.where} (GGUF metadata)")


def hf_config_from_gguf(files: GGUFModelFiles) -> dict[str, Any]:
    """The Hugging Face config.json (as a dict) that GGUF metadata describes; `config_from_gguf` parses it.

    Metadata of the wrong type or an impossible value (a string block count, zero heads) fails while the
    schema derives fields from it; that is the file's fault, so it is one line naming the file."""
    schema = arch_of_gguf(files).gguf
    try:
        return schema.hf_config(files)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, ArithmeticError) as exc:
        raise ConfigError(f"{files.where}: GGUF metadata ({schema.arch}.*) describes no model localglm can run ({exc})") from None
