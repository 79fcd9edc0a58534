"""The architecture registry: every supported model_type is one complete Arch, and an incomplete
one is refused at construction (at import) with one line naming the missing piece."""

from __future__ import annotations

import dataclasses

import pytest

from localglm.errors import CheckpointError, ConfigError
from localglm.models import ARCHITECTURES, arch_for_gguf, arch_for_model_type
from localglm.models.arch import Arch, ArchError
from localglm.models.glm4_moe import ARCH as GLM4_MOE


def test_each_architecture_is_complete_and_found_by_its_names() -> None:
    assert set(ARCHITECTURES) >= {"glm4_moe", "glm4_moe_lite", "glm_moe_dsa"}
    for arch in ARCHITECTURES.values():
        assert arch_for_model_type(arch.model_type) is arch
        assert arch_for_gguf(arch.gguf.arch, "x.gguf") is arch
        assert arch.config.model_type_name() == arch.model_type
        assert arch.tiny.spec.model_type == arch.model_type


def test_an_architecture_missing_a_piece_is_refused_with_its_name() -> None:
    with pytest.raises(ArchError, match="'glm4_moe': its gguf is missing"):
        dataclasses.replace(GLM4_MOE, gguf=None)

    class NoTensors:
        def count_params(self, cfg):  # noqa: ANN001, ANN201
            return None

    with pytest.raises(ArchError) as exc:
        dataclasses.replace(GLM4_MOE, sizes=NoTensors())
    msg = str(exc.value)
    assert "\n" not in msg and "its sizes (NoTensors) lacks" in msg and "kv_bytes_per_token" in msg


def test_a_config_of_another_model_type_is_refused() -> None:
    lite = ARCHITECTURES["glm4_moe_lite"]
    with pytest.raises(ArchError, match="parses model_type 'glm4_moe_lite'"):
        Arch(**{f.name: getattr(GLM4_MOE, f.name) for f in dataclasses.fields(Arch)} | {"config": lite.config})


def test_unknown_and_not_yet_supported_names_are_one_line_errors() -> None:
    with pytest.raises(ConfigError) as exc:
        arch_for_model_type("deepseek_v3", "x/config.json")
    msg = str(exc.value)
    assert "x/config.json" in msg and "'deepseek_v3' is not supported" in msg and "glm_moe_dsa (GLM-5, 5.1, 5.2)" in msg
    with pytest.raises(CheckpointError, match="'llama' is not supported; localglm runs 'glm4moe'"):
        arch_for_gguf("llama", "m.gguf")
