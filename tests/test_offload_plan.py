"""The placement planner and `localglm plan`, from config.json alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localglm.cli import main
from localglm.config import ModelConfig
from localglm.errors import LocalGLMError
from offload.cost_model import Bandwidths, CostModel
from offload.planner import make_plan, parse_size

AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_size": 4096, "num_hidden_layers": 46,
    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 128, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "moe_intermediate_size": 1408, "intermediate_size": 10944, "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0, "use_qk_norm": False, "vocab_size": 151552, "attention_bias": True,
    "partial_rotary_factor": 0.5, "rope_theta": 1e6, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "num_nextn_predict_layers": 1, "eos_token_id": [151329, 151336, 151338],
}  # fmt: skip


@pytest.fixture()
def air_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(AIR))
    return tmp_path


def test_parse_size() -> None:
    assert parse_size("24GiB") == 24 << 30
    assert parse_size("24G") == 24 << 30
    assert parse_size("24GB") == 24_000_000_000
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1000") == 1000
    with pytest.raises(LocalGLMError, match="cannot read"):
        parse_size("lots")


def test_air_plan_fits_24gib(air_dir) -> None:
    cfg = ModelConfig.from_file(air_dir)
    plan = make_plan(cfg, "24GiB", "128GiB", ctx=4096, experts=4)
    assert plan.used("GPU") <= plan.gpu_budget
    assert plan.n_experts_total == 45 * 128
    # Each slot holds the 4-bit blob and tinygemm's copy of it (~2x the blob): 493 slots, as the H200 run's
    # backend made 500 of a 23.5 GiB budget (BENCHMARKS.md, "GPU check").
    assert 400 < plan.cache_slots < plan.n_experts_total
    assert plan.experts_on_disk == 0
    assert plan.decode_tok_s > 1 and plan.prefill_tok_s > 1
    wheres = {i.what.split(" (")[0]: i.where for i in plan.items}
    for part in ("embeddings", "attention", "routers", "shared experts", "lm_head", "KV cache"):
        assert wheres[part] == "GPU"
    assert wheres["routed experts"] == "RAM (pinned)"
    # Less RAM: the coldest experts stay memory-mapped on disk.
    small = make_plan(cfg, "24GiB", "32GiB", ctx=4096, experts=4)
    assert small.experts_on_disk > 0 and small.used("RAM") <= small.cpu_budget
    # More context costs cache slots.
    assert make_plan(cfg, "24GiB", "128GiB", ctx=32768, experts=4).cache_slots < plan.cache_slots


def test_impossible_budgets_say_the_minimum(air_dir) -> None:
    cfg = ModelConfig.from_file(air_dir)
    with pytest.raises(LocalGLMError) as exc:
        make_plan(cfg, "4GiB", "128GiB")
    msg = str(exc.value)
    assert "\n" not in msg and "needs at least" in msg
    need = msg.split("needs at least ")[1].split(" (")[0]
    make_plan(cfg, parse_size(need.replace(" ", "")) + (64 << 20), "128GiB")  # the stated minimum works
    with pytest.raises(LocalGLMError, match="--cpu-mem .* needs at least"):
        make_plan(cfg, "0", "1GiB")


def test_cpu_only_plan(air_dir) -> None:
    plan = make_plan(ModelConfig.from_file(air_dir), 0, "96GiB", experts=4)
    assert plan.cpu_only and plan.cache_slots == 0
    assert all(i.where != "GPU" for i in plan.items)


def test_cost_model_prefers_cpu_for_one_token_and_copy_for_prefill() -> None:
    cm = CostModel(Bandwidths(), expert_bytes=9_700_000, flops_per_token=2 * 3 * 4096 * 1408)
    assert cm.decide(1) == "cpu"
    assert cm.decide(256) == "copy"
    assert cm.decide(1, expected_reuse=10) == "copy"  # a hot expert earns its slot


def test_plan_cli(air_dir, capsys) -> None:
    assert main(["plan", str(air_dir), "--gpu-mem", "24GiB", "--cpu-mem", "128GiB", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    assert "expert cache:" in out and "tok/s" in out and "KV cache" in out
    assert main(["plan", str(air_dir), "--gpu-mem", "2GiB", "--cpu-mem", "128GiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs at least" in err
    assert main(["plan", str(air_dir / "config.json"), "--gpu-mem", "24GiB", "--cpu-mem", "64GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_slots"] > 0


def test_measure_bandwidths_fills_measured_fields() -> None:
    from offload.cost_model import measure_bandwidths

    bw = measure_bandwidths("cpu", nbytes=4 << 20)
    assert bw.ram > 1e8 and bw.cpu_flops > 1e8
    assert bw.measured == ["ram", "cpu_flops"]
    assert bw.h2d == Bandwidths().h2d  # not measurable without a GPU: the assumed value stays


@pytest.mark.parametrize("experts", [2, 4, 8])
def test_plan_counts_the_cuda_kernels_copies_as_the_backend_does(air_dir, experts: int) -> None:
    """The planner's GPU bytes are what the CUDA path holds (quant.spec.cuda_prepared_nbytes): a slot is the
    blob plus its kernel copy, so a device built from the plan sizes exactly the plan's slots; a q8
    always-used matrix keeps a dense bf16 copy, so on a GPU q8 costs more than bf16 and is never chosen."""
    import torch

    from offload.backend import device_for_plan, prepared_expert_bytes, size_expert_cache
    from offload.cost_model import Bandwidths
    from offload.expert_cache import QuantCodec
    from quant.blob import ExpertBlobLayout
    from quant.spec import QuantSpec

    cfg = ModelConfig.from_file(air_dir)
    plan = make_plan(cfg, "24GiB", "128GiB", ctx=4096, experts=experts)
    spec = QuantSpec.for_bits(experts)
    codec = QuantCodec(ExpertBlobLayout(cfg.hidden_size, cfg.moe_intermediate_size, spec, spec), torch.bfloat16)
    device = device_for_plan("sim", plan, Bandwidths())
    slots = size_expert_cache(device, plan.n_experts_total, codec.nbytes, prepared_expert_bytes(codec, device))
    assert abs(slots - plan.cache_slots) <= plan.cache_slots // 100 + 1  # blob rounding (alignment) apart
    assert prepared_expert_bytes(codec, device) >= (codec.nbytes if experts == 8 else codec.nbytes // 2)
    attn = {i.what: i.bytes for i in make_plan(cfg, "64GiB", "128GiB", fixed={"attn": 8}).items}
    attn16 = {i.what: i.bytes for i in make_plan(cfg, "64GiB", "128GiB", fixed={"attn": 16}).items}
    key = next(k for k in attn if k.startswith("attention"))
    assert attn[key] > attn16[key]  # q8 stored (8.5 bits) + its dense bf16 copy (16)
    cpu = {i.what: i.bytes for i in make_plan(cfg, 0, "256GiB", fixed={"attn": 8}).items}
    assert cpu[key] < attn16[key] // 1.8  # on the CPU q8 is only its stored bytes
    assert make_plan(cfg, "24GiB", "128GiB", experts=experts).dense_bits["attn"] != 8


def test_gpu_prediction_counts_the_host_side_of_each_step(air_dir) -> None:
    """The GPU path's host work (per layer, per expert run, per kernel built for a copied expert; measured on
    the first GPU run) adds to the bandwidth model: the prediction never beats the host's own bound."""
    from offload.planner import GPU_HOST_EXPERT_S, GPU_HOST_LAYER_S, gpu_host_s

    cfg = ModelConfig.from_file(air_dir)
    plan = make_plan(cfg, "24GiB", "128GiB", ctx=4096, experts=4)
    per_token = cfg.num_hidden_layers * GPU_HOST_LAYER_S + cfg.num_moe_layers * cfg.num_experts_per_tok * GPU_HOST_EXPERT_S
    assert gpu_host_s(cfg.num_hidden_layers, cfg.num_moe_layers * cfg.num_experts_per_tok, 0) == pytest.approx(per_token)
    assert plan.decode_tok_s < 1 / per_token
    assert make_plan(cfg, 0, "128GiB", ctx=4096, experts=4).decode_tok_s > 0  # the CPU-only plan has no such term


def test_a_defaulted_cpu_budget_says_it_was_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With little RAM free the default budget (available RAM less 4 GiB) became 0 and the refusal read "--cpu-mem 0 B
    is too small", naming a flag the user never typed (a README walk-through)."""
    import offload.planner as planner

    monkeypatch.setattr(planner, "available_ram", lambda: (4 << 30) + 1000)
    (tmp_path / "config.json").write_text(json.dumps(json.loads((Path(__file__).parent / "data" / "real_configs.json").read_text())["GLM-4.5-Air"]))
    with pytest.raises(planner.BudgetTooSmall, match=r"--cpu-mem \(not given: the available RAM less 4 GiB, now 1000 B\) is too small: needs"):
        planner.make_plan(ModelConfig.from_file(tmp_path), "0", None, experts=4)
