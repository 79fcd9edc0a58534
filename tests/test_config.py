"""config.json parsing: both RoPE spellings, every GLM field, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localglm.config import ModelConfig
from localglm.errors import ConfigError

AIR = {
    "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
    "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
    "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "rope_theta": 1000000, "partial_rotary_factor": 0.5, "attention_bias": True, "use_qk_norm": False,
    "num_nextn_predict_layers": 1, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
}  # fmt: skip


def test_glm45_air_fields() -> None:
    c = ModelConfig.from_dict(AIR)
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.rotary_dim) == (4096, 46, 128, 64)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (128, 8, 1408)
    assert c.eos_token_ids == (151329, 151336, 151338)
    assert c.attention_bias and not c.use_qk_norm and c.num_nextn_predict_layers == 1
    assert c.num_moe_layers == 45 and not c.is_moe_layer(0) and c.is_moe_layer(1)


def test_rope_parameters_form_equals_legacy_form() -> None:
    modern = {k: v for k, v in AIR.items() if k not in ("rope_theta", "partial_rotary_factor")}
    modern["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000, "partial_rotary_factor": 0.5}
    assert ModelConfig.from_dict(modern) == ModelConfig.from_dict(AIR)


def test_defaults_head_dim_and_partial_factor() -> None:
    raw = {k: v for k, v in AIR.items() if k not in ("head_dim", "partial_rotary_factor", "eos_token_id")}
    c = ModelConfig.from_dict({**raw, "num_attention_heads": 32})
    assert c.head_dim == 4096 // 32 and c.partial_rotary_factor == 0.5 and c.eos_token_ids == ()
    assert ModelConfig.from_dict({**AIR, "eos_token_id": 7}).eos_token_ids == (7,)


@pytest.mark.parametrize(
    ("model_type", "named"),
    [("llama", "'llama'"), (None, "None")],
)
def test_other_model_types_are_refused_by_name(model_type: str | None, named: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ModelConfig.from_dict({**AIR, "model_type": model_type}, "x/config.json")
    msg = str(exc.value)
    assert "\n" not in msg and named in msg and "glm4_moe" in msg and "x/config.json" in msg


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": "4096"}, "hidden_size"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"n_group": 3}, "n_group"),
        ({"topk_group": 2}, "topk_group"),
        ({"eos_token_id": ["a"]}, "eos_token_id"),
        ({"rope_theta": -1}, "rope_theta"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_fields_are_named(change: dict, field: str) -> None:
    raw = {**AIR, **change}
    if change.get("hidden_size", 0) is None:
        del raw["hidden_size"]
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(raw)


def test_unsupported_rope_type_raises_not_implemented() -> None:
    with pytest.raises(NotImplementedError, match="yarn"):
        ModelConfig.from_dict({**AIR, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(AIR))
    assert ModelConfig.from_file(tmp_path).hidden_size == 4096
