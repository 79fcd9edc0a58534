"""The published configs of every supported GLM: parsed, counted as the model cards count them, and
planned onto the card the product is for (24 GiB of GPU, 256 GiB of RAM, 4-bit experts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localglm.cli import main
from localglm.config import ModelConfig
from localglm.errors import LocalGLMError
from localglm.model_info import count_params, parse_size
from offload.planner import make_plan

CONFIGS = json.loads((Path(__file__).parent / "data" / "real_configs.json").read_text())
# Published totals (model cards): total and active parameters, in billions.
PUBLISHED = {
    "GLM-4.5": (355, 32), "GLM-4.5-Air": (106, 12), "GLM-4.6": (355, 32), "GLM-4.7": (355, 32), "GLM-4.7-Flash": (30, 3),
    "GLM-5": (744, 40), "GLM-5.1": (744, 40), "GLM-5.2": (744, 40),
}  # fmt: skip


@pytest.fixture(params=list(CONFIGS))
def real(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[request.param]))
    return request.param, tmp_path


def test_parameter_counts_match_the_model_cards(real: tuple[str, Path]) -> None:
    name, path = real
    c = count_params(ModelConfig.from_file(path))
    total, active = PUBLISHED[name]
    assert abs(c.total / 1e9 - total) <= 0.02 * total, c.total
    # GLM-4.7-Flash is published as "30B-A3B": its 3.26B active (embeddings excluded) is the one above 2%.
    assert abs(c.active / 1e9 - active) <= (0.1 if name == "GLM-4.7-Flash" else 0.02) * active, c.active


def test_every_glm_plans_onto_24_gib_and_256_gib_at_4_bit_experts(real: tuple[str, Path], capsys: pytest.CaptureFixture) -> None:
    name, path = real
    bits = 2 if name.startswith("GLM-5") else 4  # GLM-5.x's published consumer path: 2-bit experts
    plan = make_plan(ModelConfig.from_file(path), "24GiB", "256GiB", ctx=4096, experts=bits)
    assert plan.used("GPU") <= plan.gpu_budget and plan.experts_on_disk == 0
    assert plan.cache_slots >= 2 * CONFIGS[name]["num_experts_per_tok"]
    assert plan.decode_tok_s > 1 and plan.prefill_tok_s > 1
    wheres = {i.what.split(" (")[0]: i.where for i in plan.items}
    assert wheres["attention"] == wheres["shared experts"] == "GPU"
    if name in ("GLM-4.5", "GLM-4.6", "GLM-4.7") or name.startswith("GLM-5"):
        # 355B / 744B: 34 / 39 GiB of always-used weights in bf16. On a GPU q8 keeps a dense bf16 copy beside
        # its bytes (quant/cuda_kernels.py), so it costs more than bf16: the planner takes q4 and says so
        assert plan.dense_bits["attn"] == 4 and "attn" in plan.chosen
    else:
        assert plan.dense_bits["attn"] == 16 and not plan.chosen  # bf16 fits: the most precise
    assert main(["plan", str(path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--experts", str(bits)]) == 0
    out = capsys.readouterr().out
    assert "predicted: decode" in out and "always-used weights:" in out


def test_the_users_class_bits_are_kept_and_too_small_a_budget_names_its_minimum(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["GLM-4.6"]))
    cfg = ModelConfig.from_file(tmp_path)
    plan = make_plan(cfg, "24GiB", "256GiB", experts=4, fixed={"embed": 4, "lm_head": 8})
    assert plan.dense_bits["embed"] == 4 and plan.dense_bits["lm_head"] == 8 and plan.dense_bits["attn"] == 4
    assert "embed" not in plan.chosen
    with pytest.raises(LocalGLMError) as exc:
        make_plan(cfg, "8GiB", "256GiB", experts=4)
    msg = str(exc.value)
    assert "\n" not in msg and "needs at least" in msg
    need = parse_size(msg.split("needs at least ")[1].split(" (")[0].replace(" ", ""))
    assert make_plan(cfg, need + (64 << 20), "256GiB", experts=4).dense_bits["attn"] == 4  # the stated minimum works
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--attn", "4", "--experts", "2"]) == 0
    out = capsys.readouterr().out
    assert "attn q4" in out
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--experts", "3"]) == 2
    assert "bits must be one of 2, 4, 8 or 16" in capsys.readouterr().err


def test_inspect_prints_each_real_config(real: tuple[str, Path], capsys: pytest.CaptureFixture) -> None:
    name, path = real
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert CONFIGS[name]["model_type"] in out and "parameters total" in out and "KV cache" in out


@pytest.mark.parametrize("name,ctx", [("GLM-5.1", 65536), ("GLM-5.2", 131072)])
def test_glm5_at_long_context_keeps_the_latent_rows_in_pinned_ram(name: str, ctx: int, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """At long contexts GLM-5.x's latent rows (~11 GiB at 131k) and the model do not share a 24 GiB card:
    the plan puts the rows in pinned RAM, keeps the indexer keys on the GPU, and prices each token's top-k
    gather. (GLM-5.1 at 131k does not fit 24 GiB at all while the CUDA kernels keep a copy of each q4
    matrix beside its bytes: the always-used weights, KV keys and workspace alone are 23.9 GiB.)"""
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    cfg = ModelConfig.from_file(tmp_path)
    plan = make_plan(cfg, "24GiB", "256GiB", ctx=ctx, experts=2)
    assert plan.kv_in_ram and plan.used("GPU") <= plan.gpu_budget and plan.decode_tok_s > 1
    wheres = {i.what: i.where for i in plan.items}
    assert wheres[f"KV cache: latent rows ({ctx} tokens)"] == "RAM (pinned)" and wheres[f"KV cache: indexer keys ({ctx} tokens)"] == "GPU"
    rows = cfg.num_hidden_layers * cfg.index_topk * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert plan.kv_gather_bytes == rows  # 78 layers x 2048 rows x 1152 bytes a token
    try:
        with_kv_on_gpu = make_plan(cfg, "24GiB", "256GiB", ctx=ctx, experts=2, kv="gpu")
        assert with_kv_on_gpu.decode_tok_s <= plan.decode_tok_s  # "auto" kept the faster placement
    except LocalGLMError:
        pass  # the whole cache does not fit beside the weights
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--experts", "2", "--ctx", str(ctx)]) == 0
    assert "latent rows in pinned RAM, indexer keys on the GPU" in capsys.readouterr().out
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--ctx", "4096", "--kv", "ram"]) == 0


def test_kv_in_ram_is_refused_where_attention_reads_every_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["GLM-4.5-Air"]))
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--kv", "ram"]) == 2
    assert "--kv ram" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "gpu", "cpu"), [("GLM-5.1", "0", "256GiB"), ("GLM-5.1", "24GiB", "218GiB"), ("GLM-4.5", "24GiB", "100GiB")])
def test_a_plan_with_the_mtp_blocks_wider_experts_keeps_to_the_ram_budget(name: str, gpu: str, cpu: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The experts that fit in RAM were counted at the main size while the MTP block's are 8-bit: "RAM 258.38 GiB of
    256.00 GiB" (a planner sweep). Now the excess stays memory-mapped on disk."""
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    assert main(["plan", str(tmp_path), "--gpu-mem", gpu, "--cpu-mem", cpu, "--experts", "2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RAM "))
    used, budget = (float(v) for v in line.split()[1:5:3])
    assert used <= budget, line


def test_plan_edge_configs_in_one_line_or_a_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A sweep's findings: every layer dense (ZeroDivisionError beside the MTP block's slots), 2**31 - 1 layers
    (minutes and gigabytes building GLM-5.2's per-layer table), max_position_embeddings 1 (an error naming --ctx,
    which nobody gave), and a plan that left every class in float saying "(as given)"."""
    flash = {**CONFIGS["GLM-4.7-Flash"], "first_k_dense_replace": CONFIGS["GLM-4.7-Flash"]["num_hidden_layers"]}
    (tmp_path / "config.json").write_text(json.dumps(flash))
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "64GiB"]) == 0
    for edit, needle in (({"num_hidden_layers": 2**31 - 1}, "'num_hidden_layers'"), ({"max_position_embeddings": 1}, "'max_position_embeddings'")):
        (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["GLM-5.2"], **edit}))
        for cmd in ("inspect", "plan"):
            assert main([cmd, str(tmp_path)]) == 2 and needle in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["GLM-4.5-Air"]))
    capsys.readouterr()
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("always-used weights"))
    assert "as given" not in line and "the planner's" in line, line


def test_plan_prices_float_weights_at_the_dtype_loading_uses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A float32 checkpoint computes in float32 when loaded; plan priced its float weights as bf16 and said they fit
    where loading refused (a planner sweep). --dtype bfloat16 plans what `generate --dtype bfloat16` loads."""
    (tmp_path / "config.json").write_text(json.dumps({**CONFIGS["GLM-4.5-Air"], "torch_dtype": "float32"}))
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB"]) == 2 and "too small" in capsys.readouterr().err
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "256GiB", "--dtype", "bfloat16"]) == 0
