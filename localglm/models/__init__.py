"""The architecture registry: `model_type` (config.json) or GGUF `general.architecture` -> `Arch`.

Adding a GLM variant is one folder here and one line in `ARCHITECTURES`.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from .arch import Arch
from .glm4_moe import ARCH as GLM4_MOE
from .glm4_moe_lite import ARCH as GLM4_MOE_LITE
from .glm_moe_dsa import ARCH as GLM_MOE_DSA

ARCHITECTURES: dict[str, Arch] = {a.model_type: a for a in (GLM4_MOE, GLM4_MOE_LITE, GLM_MOE_DSA)}

# Known GLM architectures not runnable yet: named in the refusal so the user knows why.
NOT_YET: dict[str, str] = {}
NOT_YET_GGUF = {"glm4": "dense GLM-4"}


def _supported() -> str:
    return ", ".join(f"{a.model_type} ({a.title})" for a in ARCHITECTURES.values())


def arch_for_model_type(model_type: object, source: str = "config.json") -> Arch:
    """The architecture of a config.json `model_type`; a one-line ConfigError naming the source otherwise."""
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        what = NOT_YET.get(str(model_type))
        extra = f" ({what}) is not supported yet" if what else " is not supported"
        raise ConfigError(f"{source}: model_type {model_type!r}{extra}; supported: {_supported()}")
    return arch


def arch_for_gguf(name: object, where: str) -> Arch:
    """The architecture of a GGUF `general.architecture`; a one-line CheckpointError otherwise."""
    for arch in ARCHITECTURES.values():
        if arch.gguf.arch == name:
            return arch
    what = NOT_YET_GGUF.get(str(name))
    extra = f" ({what})" if what else ""
    known = ", ".join(f"{a.gguf.arch!r} ({a.title})" for a in ARCHITECTURES.values())
    raise CheckpointError(f"{where}: GGUF architecture {name!r}{extra} is not supported; localglm runs {known}")


def arch_of(cfg: ModelConfig) -> Arch:
    """The architecture a parsed config belongs to."""
    return arch_for_model_type(cfg.model_type)


__all__ = ["ARCHITECTURES", "Arch", "arch_for_gguf", "arch_for_model_type", "arch_of"]
