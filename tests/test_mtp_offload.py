"""The MTP block's routed experts behind the offloaded expert backend (offload/backend.py), and the plan.

- Offloaded (simulated device), the block's MoE layer is one more layer of the backend: its experts are
  copied into the device expert cache (counted in bytes_moved), routed through its router statistics,
  predicted from its own input for prefetch; greedy speculation still gives plain decoding's tokens.
- Where the block's experts are stored wider than the main ones (8 bits beside 4), they get slots of
  their own size and never take or evict a main expert's slot.
- The plan places the block's always-used weights and KV cache on the device and counts its experts;
  `localglm plan` says so; a budget that fits the model but not the block is refused in one line when
  MTP is asked for and leaves it out (with a warning) by default.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import localglm
from localglm.cli import main
from localglm.config import ModelConfig
from localglm.errors import LocalGLMError
from localglm.layers.experts import combine_experts
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.sampling import SamplingParams
from localglm.tiny import make_tiny
from offload.device import SimulatedDevice
from offload.expert_cache import ExpertCache, SlotClass
from offload.planner import BudgetTooSmall, MtpPlacement, make_plan, parse_size, plan_with_mtp
from offload.policies import LRU
from offload.router_stats import RouterStats

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0)
SPEC = TinySpec(dtype="float32")
PROMPT = list(range(30, 52))
AIR = json.loads((Path(__file__).parent / "data" / "real_configs.json").read_text())["GLM-4.5-Air"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("mtp-offload") / "m", SPEC)


def _load(path: Path, tmp_path: Path, **kw: Any) -> localglm.Model:
    opts: dict[str, Any] = dict(offload="sim", gpu_mem="64MiB", cache_slots=8, ctx=128, stats_path=tmp_path / "s.npz")
    return localglm.load(path, **(opts | kw))


def _tokens(model: localglm.Model, draft: int) -> list[int]:
    assert model.speculation is not None
    model.speculation.set_draft(draft, adaptive=False)
    return list(model.stream_tokens(PROMPT, max_new_tokens=24, sampling=GREEDY, reuse_prefix=False))


def _record_copies(backend: Any) -> list[int]:
    """Every key copied into the cache from now on (demand and prefetch)."""
    keys: list[int] = []
    real = backend.cache.insert

    def insert(key: int, *args: Any, **kw: Any) -> Any:
        slot = real(key, *args, **kw)
        if slot is not None:
            keys.append(key)
        return slot

    backend.cache.insert = insert
    return keys


def test_offloaded_mtp_experts_go_through_the_cache(tiny: Path, tmp_path: Path) -> None:
    model = _load(tiny, tmp_path)
    cfg, backend = model.config, model.net.experts
    block = cfg.num_hidden_layers
    assert model.speculation is not None
    assert backend.moe_layers == [*cfg.moe_layers, block]
    assert model.speculation.head.block.experts.inner is backend  # the block's layer 0 is the backend's layer N
    assert backend.plan.mtp_layer == block and any(i.what.startswith("MTP block") for i in backend.plan.items)
    li = backend.index[block]
    plain = _tokens(model, 0)
    assert backend.counters.layer_uses.get(block, 0) == 0  # plain decoding never runs the block
    predicted: list[tuple[int, list[int]]] = []
    real_predict = backend.predictor.predict
    backend.predictor.predict = lambda layer, x: (lambda p: (predicted.append((layer, sorted(p))), p)[1])(real_predict(layer, x))
    copies = _record_copies(backend)
    before = backend.counters.copy()
    assert _tokens(model, 3) == plain  # greedy: token for token plain decoding
    d = backend.counters.minus(before)
    assert d.layer_uses[block] > 0 and backend.stats.counts[li].sum() > 0  # routed through the backend, counted
    mtp_keys = [k for k in copies if k // cfg.n_routed_experts == li]
    assert mtp_keys, "the block's experts were never copied into the device cache"
    # every copy, the block's included, is in the bytes moved
    assert d.bytes_moved == sum(backend.codecs[backend.moe_layers[k // cfg.n_routed_experts]].nbytes for k in copies)
    assert d.layer_uses[block] - d.layer_hits.get(block, 0) > 0  # misses of the block's layer, served by copies
    assert (block, [block]) in predicted  # the block's input predicts its own experts, and only them
    assert all(block not in targets for layer, targets in predicted if layer != block)
    snap = backend.stats_snapshot()
    assert block in snap["layer_hit_rate"] and block in snap["layer_heat"] and snap["mtp_layer"] == block
    assert snap["slot_sizes"] == [[8, backend.codecs[block].nbytes]]  # one size: the block's experts share the slots


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wider_mtp_experts_get_slots_of_their_own(tiny: Path, tmp_path: Path, dtype: str) -> None:
    """bf16: a verification's quantized expert products are rounded as a decoded token's are (combine_experts)."""
    model = _load(tiny, tmp_path, experts_bits=4, cache_slots=10, dtype=dtype)  # main experts q4, the block's q8 (the recipe's "mtp" class)
    cfg, backend = model.config, model.net.experts
    block = cfg.num_hidden_layers
    main_bytes, mtp_bytes = backend.codecs[cfg.moe_layers[0]].nbytes, backend.codecs[block].nbytes
    assert mtp_bytes > main_bytes
    cache = backend.cache
    assert [(c.blob_bytes) for c in cache.classes] == [main_bytes, mtp_bytes]
    assert cache.classes[1].n_slots >= cfg.num_experts_per_tok and cache.n_slots == 10
    assert backend.stats_snapshot()["slot_sizes"] == [[c.n_slots, c.blob_bytes] for c in cache.classes]
    plain = _tokens(model, 0)
    copies = _record_copies(backend)
    assert _tokens(model, 3) == plain
    assert any(k // cfg.n_routed_experts == backend.index[block] for k in copies)
    for key, slot in cache.slot_of.items():  # each key in a slot of its own class
        assert cache.slot_class[slot] == cache.key_class[key]
        assert cache.slot_bytes[slot] == backend.codecs[backend.moe_layers[key // cfg.n_routed_experts]].nbytes


def test_slot_classes_take_and_evict_only_their_own() -> None:
    dev = SimulatedDevice(10_000)
    cache = ExpertCache(dev, 0, 0, 6, LRU(6), [SlotClass(2, 16), SlotClass(1, 32)], np.array([0, 0, 0, 0, 1, 1]))
    small, wide = torch.arange(16, dtype=torch.uint8), torch.arange(32, dtype=torch.uint8)
    assert cache.n_slots == 3 and dev.budget.used == 2 * 16 + 32  # one allocation, each class at its size
    s4 = cache.insert(4, wide, 0.0)
    assert s4 is not None and torch.equal(cache.slot_tensor(s4), wide)
    assert cache.insert(0, small, 1.0) is not None and cache.insert(1, small, 2.0) is not None
    assert not cache.has_free(2) and not cache.has_free(5)
    cache.policy.access(np.array([4]), 0.0)
    cache.policy.access(np.array([0, 1]), 5.0)  # the wide expert is the least recent of all
    assert cache.insert(2, small, 6.0) is not None
    assert cache.cached[4] and not cache.cached[0]  # a narrow key evicts a narrow one, not the older wide one
    assert cache.insert(5, wide, 7.0) == s4 and not cache.cached[4]  # and the wide one only the wide one


def test_router_profile_saved_without_the_block_is_kept() -> None:
    old = RouterStats([1, 2], 4, 2)
    old.update(1, torch.tensor([[0, 1]]))
    old.update(2, torch.tensor([[2, 3]]))
    new = old.restricted([1, 2, 3])
    assert new.moe_layers == [1, 2, 3] and new.tokens == 1
    assert np.array_equal(new.counts[:2], old.counts) and new.counts[2].sum() == 0
    assert np.array_equal(new.cooc[0], old.cooc[0]) and new.cooc[1].sum() == 0


# ---- the plan --------------------------------------------------------------------------------------


def test_plan_places_the_block() -> None:
    cfg = ModelConfig.from_dict(AIR)
    without = make_plan(cfg, "24GiB", "128GiB", ctx=4096, experts=4)
    same = make_plan(cfg, "24GiB", "128GiB", ctx=4096, experts=4, mtp=MtpPlacement(bits=8, expert_bits=4))
    wide = make_plan(cfg, "24GiB", "128GiB", ctx=4096, experts=4, mtp=MtpPlacement(bits=8, expert_bits=8))
    for plan in (same, wide):
        assert plan.mtp_layer == 46 and plan.n_experts_total == without.n_experts_total + 128
        items = {i.what: i for i in plan.items}
        assert items["MTP block (layer 46, q8)"].where == "GPU" and items["MTP block KV cache (4096 tokens, bf16)"].bytes > 0
        assert plan.mtp_bytes == items["MTP block (layer 46, q8)"].bytes + items["MTP block KV cache (4096 tokens, bf16)"].bytes
        assert plan.used("GPU") <= plan.gpu_budget
        assert "MTP block (layer 46" in plan.table()
    # one slot size: the block's experts share the cache, which shrank by the block's bytes
    assert same.mtp_cache_slots == 0 and same.cache_slots == (without.gpu_budget - without.used("GPU") + without.cache_slots * without.slot_bytes - same.mtp_bytes) // same.slot_bytes
    # 8-bit experts beside 4-bit ones: slots of their own, about the same share of the block's experts as of the others'
    assert wide.mtp_cache_slots >= 8 and abs(wide.mtp_cache_slots / 128 - wide.cache_slots / without.n_experts_total) < 0.01
    own = make_plan(cfg, "24GiB", "128GiB", ctx=4096, experts=4, mtp=MtpPlacement(bits=8, expert_bits=4, own_embed=True, own_head=True))
    # its own embedding and head at q8 (8.5 bits), the head multiplied through a dense bf16 copy on the GPU (16 more)
    assert own.mtp_bytes - same.mtp_bytes == pytest.approx(151552 * 4096 * (8.5 + 8.5 + 16) / 8, rel=0.01)


def test_plan_refuses_a_block_that_does_not_fit() -> None:
    cfg = ModelConfig.from_dict(AIR)
    place = MtpPlacement(bits=8, expert_bits=8)
    fixed = {"attn": 8, "shared": 8, "dense": 8, "embed": 8, "lm_head": 8}
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(cfg, "1GiB", "128GiB", experts=4, fixed=fixed)
    need_without = parse_size(re.search(r"needs at least ([0-9.]+ \w+)", str(info.value)).group(1).replace(" ", ""))
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(cfg, need_without, "128GiB", experts=4, fixed=fixed, mtp=place)
    msg = str(info.value)
    assert "\n" not in msg and "with its MTP block" in msg and "--no-mtp" in msg
    need = parse_size(re.search(r"needs at least ([0-9.]+ \w+)", msg).group(1).replace(" ", ""))
    assert need > need_without
    assert make_plan(cfg, need, "128GiB", experts=4, fixed=fixed, mtp=place).mtp_layer == 46  # the stated minimum works
    # by default (not asked for) the plan leaves it out and says why
    plan = plan_with_mtp(cfg, need_without, "128GiB", experts=4, fixed=fixed, mtp=place, required=False)
    assert plan.mtp_layer is None and "does not fit" in plan.mtp_left_out and "MTP block left out" in plan.table()
    # nor does it lower the always-used weights' precision to fit the block (a budget bf16 just fits without it)
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(cfg, "1GiB", "128GiB", experts=4, fixed=dict.fromkeys(fixed, 16))
    need16 = parse_size(re.search(r"needs at least ([0-9.]+ \w+)", str(info.value)).group(1).replace(" ", ""))
    loose = plan_with_mtp(cfg, need16 + (200 << 20), "128GiB", experts=4, mtp=place, required=False)
    assert loose.mtp_layer is None and "lower precision" in loose.mtp_left_out
    # asked for (--mtp) it is placed there, and the plan says what --no-mtp would keep (greedy output differs)
    asked = plan_with_mtp(cfg, need16 + (200 << 20), "128GiB", experts=4, mtp=place, required=True)
    assert asked.mtp_layer == 46 and asked.mtp_lowered.startswith("attn bf16") and "--no-mtp gives attn bf16" in asked.table()
    roomy = plan_with_mtp(cfg, "80GiB", "128GiB", experts=4, mtp=place, required=True)
    assert roomy.mtp_layer == 46 and roomy.mtp_lowered == ""


def test_plan_cli_mtp(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(json.dumps(AIR))
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "128GiB"]) == 0
    out = capsys.readouterr().out
    assert "MTP block (layer 46, q8)" in out and "MTP block (layer 46, speculative drafts)" in out
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "128GiB", "--no-mtp"]) == 0
    assert "MTP" not in capsys.readouterr().out
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "128GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mtp_layer"] == 46
    # a Hugging Face index naming the block's own embedding and head: planned too
    names = {f"model.layers.46.{t}.weight": "a.safetensors" for t in ("embed_tokens", "shared_head.head", "eh_proj")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    assert main(["plan", str(tmp_path), "--gpu-mem", "24GiB", "--cpu-mem", "128GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mtp_bytes"] > 2 * 151552 * 4096
    assert main(["plan", str(tmp_path), "--gpu-mem", "12GiB", "--cpu-mem", "128GiB", "--attn", "16", "--mtp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("localglm: error: --gpu-mem 12.00 GiB is too small") and "MTP block" in err and err.count("\n") == 1


def test_loader_leaves_out_or_refuses_a_block_that_does_not_fit(tiny: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.from_file(tiny)
    fixed = {"attn": 8, "shared": 8, "dense": 8, "embed": 8, "lm_head": 8}  # experts_bits=4's recipe: its defaults
    with pytest.raises(BudgetTooSmall) as info:
        make_plan(cfg, 1, "1GiB", ctx=128, experts=4, fixed=fixed, float_bits=32)
    budget = parse_size(re.search(r"needs at least ([0-9.]+ \w+)", str(info.value)).group(1).replace(" ", ""))
    opts: dict[str, Any] = dict(experts_bits=4, gpu_mem=budget, cache_slots=None, cpu_mem="1GiB")
    with pytest.raises(LocalGLMError, match="with its MTP block.*--no-mtp"):
        _load(tiny, tmp_path, mtp=True, **opts)
    with pytest.warns(UserWarning, match=r"speculative drafts \(MTP\) off: it does not fit"):
        model = _load(tiny, tmp_path, **opts)
    assert model.speculation is None and model.net.experts.moe_layers == cfg.moe_layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _load(tiny, tmp_path, **(opts | {"gpu_mem": "64MiB"}))
    assert model.speculation is not None and model.net.experts.moe_layers[-1] == cfg.num_hidden_layers


def test_a_verification_sums_quantized_experts_as_decoding_does() -> None:
    """Offloaded quantized experts return fp32 rows on the CPU (quant.blob.PreparedExpert): a batch's
    weighted products are summed unrounded, as one token's are, so a bf16 verification gives each token
    the numbers plain decoding gives it (the default model quantized to q4 differed at token 59 before)."""
    torch.manual_seed(0)
    x = torch.randn(6, 32).to(torch.bfloat16)
    scale, bias = torch.randn(4, 32), torch.randn(4, 32)

    def compute(e: int, xs: torch.Tensor) -> torch.Tensor:  # row by row, fp32 out
        return xs.float() * scale[e] + bias[e]

    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    weights = torch.rand(6, 2)
    batch = combine_experts(x, ids, weights, compute)
    for i in range(len(x)):
        assert torch.equal(batch[i], combine_experts(x[i : i + 1], ids[i : i + 1], weights[i : i + 1], compute)[0])


def test_mapped_quantized_dir_with_the_block(tiny: Path, tmp_path: Path) -> None:
    """A localglm quantized directory (experts q4, the block's q8) offloaded with a --cpu-mem that holds only
    a few experts: the hottest that fit (by bytes) are copied to host RAM, the others, the block's among
    them, stay mapped and are read from the files into the device cache; greedy speculation is plain decoding."""
    from localglm.quantize import quantize_checkpoint

    q = tmp_path / "q"
    quantize_checkpoint(tiny, q, None)
    cfg = ModelConfig.from_file(q)
    probe = _load(q, tmp_path / "probe")
    main_bytes, mtp_bytes = probe.net.experts.codecs[cfg.moe_layers[0]].nbytes, probe.net.experts.codecs[cfg.num_hidden_layers].nbytes
    assert mtp_bytes > main_bytes
    room = 3 * main_bytes + mtp_bytes
    model = _load(q, tmp_path, cpu_mem=2 * cfg.num_experts_per_tok * main_bytes + room, stats_path=tmp_path / "m.npz")  # staging + room
    be = model.net.experts
    assert be.plan.expert_ram_bytes == room
    # equal heat (no profile yet): the smaller q4 blobs first, as many as fit (room // main_bytes); the rest, the block's among them, stay mapped
    assert be.experts_mapped == len(be.moe_layers) * cfg.n_routed_experts - room // main_bytes
    plain = _tokens(model, 0)
    copies = _record_copies(be)
    assert _tokens(model, 3) == plain
    assert any(k // cfg.n_routed_experts == be.index[cfg.num_hidden_layers] for k in copies)


@pytest.mark.parametrize("mmap", [True, False])
def test_float_main_experts_beside_the_quantized_block(tiny: Path, tmp_path: Path, mmap: bool) -> None:
    """`quantize --experts 16` keeps the main experts float and the block's at 8 bits: offloaded, the
    block's blobs (mapped views of its shard, or copies) are packed apart from the float ones, and
    greedy speculation is plain decoding."""
    from localglm.quantize import quantize_checkpoint
    from quant.recipe import Recipe, default_bits

    q = tmp_path / "q"
    quantize_checkpoint(tiny, q, Recipe(bits={**default_bits(), "experts": 16}))
    model = _load(q, tmp_path, mmap=mmap)
    be, n = model.net.experts, model.config.num_hidden_layers
    assert be.codecs[n].nbytes < be.codecs[model.config.moe_layers[0]].nbytes  # q8 beside float32
    plain = _tokens(model, 0)
    assert _tokens(model, 3) == plain
