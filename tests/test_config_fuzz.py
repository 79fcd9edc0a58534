"""Config fuzz: every numeric field of config.json (and of GGUF metadata) at 0, negative, huge, NaN and
of the wrong type, and JSON nested 100k deep. Each value is either refused with one line naming the
field (a ConfigError), or accepted and then usable by `inspect` and `plan` without an exception;
values no GLM can have (a zero width, a negative count, a scale of 1e300) must be refused."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from localglm.config import ModelConfig
from localglm.errors import LocalGLMError
from localglm.model_info import describe
from offload.planner import make_plan
from tests.probes import run_cli

CONFIGS = json.loads((Path(__file__).parent / "data" / "real_configs.json").read_text())
BASES = {"glm4_moe": CONFIGS["GLM-4.5-Air"], "glm4_moe_lite": CONFIGS["GLM-4.7-Flash"]}

POSITIVE = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "moe_intermediate_size", "n_routed_experts",
            "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"]  # fmt: skip
NON_NEGATIVE = ["n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"]
TOKEN_IDS = ["pad_token_id", "eos_token_id"]
FLOATS = ["routed_scaling_factor", "rms_norm_eps", "rope_theta", "partial_rotary_factor"]
OWN = {
    "glm4_moe": ["num_attention_heads", "num_key_value_heads", "head_dim"],
    "glm4_moe_lite": ["num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"],
}
HUGE_INT = 2**40


def _cases() -> list[tuple[str, str, Any, bool]]:
    """(architecture, field, value, must_refuse)."""
    cases: list[tuple[str, str, Any, bool]] = []
    for arch in BASES:
        ints = POSITIVE + OWN[arch]
        for f in ints + NON_NEGATIVE + TOKEN_IDS:
            zero_ok = f in NON_NEGATIVE or f in TOKEN_IDS
            cases += [(arch, f, 0, not zero_ok), (arch, f, -1, True), (arch, f, HUGE_INT, True), (arch, f, "8", True),
                      (arch, f, [8] if f not in TOKEN_IDS else ["8"], True), (arch, f, True, True), (arch, f, 8.5, True)]  # fmt: skip
        for f in FLOATS:
            cases += [(arch, f, 0, True), (arch, f, -1.0, True), (arch, f, 1e300, f != "rope_theta"), (arch, f, math.nan, True),
                      (arch, f, math.inf, True), (arch, f, "1.0", True), (arch, f, True, True)]  # fmt: skip
    # the cross-field nonsense the issue names
    cases += [("glm4_moe", "num_experts_per_tok", 200, True), ("glm4_moe", "first_k_dense_replace", 47, True)]
    return cases


CASES = _cases()


def _usable(cfg: ModelConfig) -> None:
    """What inspect and plan do with a config: neither may raise anything but a one-line error."""
    describe(cfg, ctx=4096)
    try:
        make_plan(cfg, 0, 2**40, ctx=64, experts=4)
    except LocalGLMError:
        pass


@pytest.mark.parametrize(("arch", "field", "value", "must_refuse"), CASES, ids=[f"{a}-{f}-{v!r}" for a, f, v, _ in CASES])
def test_config_field_values(arch: str, field: str, value: Any, must_refuse: bool) -> None:
    raw = {**BASES[arch], field: value}
    try:
        cfg = ModelConfig.from_dict(raw, "probe/config.json")
    except LocalGLMError as exc:
        msg = str(exc)
        assert "\n" not in msg and "probe/config.json" in msg, f"unclear: {msg}"
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback: {type(exc).__name__}: {exc} (from_dict)")
    assert not must_refuse, f"accepted: {field}={value!r}"
    try:
        _usable(cfg)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback: {type(exc).__name__}: {exc} (inspect/plan)")


def test_real_configs_still_parse() -> None:
    from localglm.models import ARCHITECTURES

    for name, raw in CONFIGS.items():
        if raw.get("model_type") in ARCHITECTURES:  # the file may list models whose architecture is still being added
            _usable(ModelConfig.from_dict(raw, name))


def test_deeply_nested_config_json_is_one_line(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    text = json.dumps(BASES["glm4_moe"])[:-1] + ', "extra": ' + deep + "}"
    (tmp_path / "config.json").write_text(text)
    o = run_cli("inspect", tmp_path)
    assert o.kind == "clean" and "config.json" in o.err, o.why()
    o = run_cli("plan", tmp_path, "--gpu-mem", "0", "--cpu-mem", "1TiB")
    assert o.kind == "clean" and "config.json" in o.err, o.why()


def test_top_level_and_nested_types(tmp_path: Path) -> None:
    for text in ("[]", "3", '"x"', "null", json.dumps({**BASES["glm4_moe"], "rope_parameters": [1]}),
                 json.dumps({**BASES["glm4_moe"], "quantization_config": 5}), json.dumps({**BASES["glm4_moe"], "mlp_layer_types": "dense"})):  # fmt: skip
        (tmp_path / "config.json").write_text(text)
        o = run_cli("inspect", tmp_path)
        assert o.kind in ("clean", "ok"), o.why()
        if o.kind == "ok":
            assert "quantization_config" in text  # inspect does not read the weights' quantization


# ---- GGUF metadata: the same values through config_from_gguf --------------------------------------------
GGUF_KEYS = ["block_count", "embedding_length", "feed_forward_length", "expert_feed_forward_length", "expert_count",
             "expert_used_count", "attention.head_count", "attention.head_count_kv", "attention.key_length",
             "context_length", "rope.freq_base", "attention.layer_norm_rms_epsilon", "expert_weights_scale"]  # fmt: skip
GGUF_VALUES = [0, -1, HUGE_INT, "8", math.nan]


@pytest.fixture(scope="module")
def gguf_file(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from localglm.checkpoint.gguf import export_gguf

    return export_gguf(tiny_dir, tmp_path_factory.mktemp("fuzz") / "tiny.gguf", "f16")[0]


@pytest.mark.parametrize(("key", "value"), [(k, v) for k in GGUF_KEYS for v in GGUF_VALUES], ids=[f"{k}-{v!r}" for k in GGUF_KEYS for v in GGUF_VALUES])
def test_gguf_metadata_values(gguf_file: Path, key: str, value: Any) -> None:
    from localglm.checkpoint.gguf import config_from_gguf
    from localglm.checkpoint.gguf_file import GGUFModelFiles

    with GGUFModelFiles(gguf_file) as files:
        files.metadata[f"glm4moe.{key}"] = value
        try:
            cfg = config_from_gguf(files)
        except LocalGLMError as exc:
            assert "\n" not in str(exc) and gguf_file.name in str(exc), f"unclear: {exc}"
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"traceback: {type(exc).__name__}: {exc} (config_from_gguf)")
    try:
        _usable(cfg)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback: {type(exc).__name__}: {exc} (inspect/plan)")
    huge_ok = key == "rope.freq_base" and value == HUGE_INT  # a large RoPE base is legitimate
    # float keys go through numpy's float32, which reads the string "8" as 8.0: lenient, and harmless
    text_ok = key in ("rope.freq_base", "expert_weights_scale") and value == "8"
    nan = isinstance(value, float) and math.isnan(value)
    assert not ((value == -1) or (value == "8" and not text_ok) or (value == HUGE_INT and not huge_ok) or nan), f"accepted: {key}={value!r}"
