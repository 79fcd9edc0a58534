"""Placement planner: from memory budgets and config.json alone, where every part of the model
lives (GPU / pinned RAM / memory-mapped disk), how many experts the GPU cache holds, and the
tok/s the cost model predicts.

Always-used parts (embeddings, attention, norms, routers, shared experts, dense layers, lm_head,
KV cache, a workspace) go on the GPU; the rest of the GPU budget becomes expert-cache slots; the
routed experts live in (pinned) host RAM as far as it holds them, the rest stays mapped on disk.
With no GPU budget the plan is CPU-only: everything always-used in RAM, experts in RAM or on disk.

The precision of the always-used weights is the planner's choice where the user gave none: the most
precise of bf16, q8 and q4 with which the plan fits (the user's per-class bits are kept as given).
GPU bytes are counted as localglm's CUDA kernels hold them (quant.spec.cuda_prepared_nbytes): a q2/q4
matrix keeps tinygemm's int4 copy beside its bytes, a q8 one a dense copy in the compute dtype (so on
a GPU q8 costs more than bf16 and is never the choice), and an expert-cache slot holds the blob and
its kernel copy. A GLM-4.6 in bf16 needs ~34 GiB of always-used weights; at q4 it fits one 24 GiB card
with room for the expert cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from localglm.config import ModelConfig
from localglm.errors import LocalGLMError
from localglm.model_info import DENSE_CLASSES, KV_PLACES, count_params, hostable_kv, human_bytes, kv_cache_bytes, parse_size

from .cost_model import Bandwidths, CostModel

# The levels the planner tries for the always-used weights (model_info.DENSE_CLASSES), most precise first.
DENSE_LEVELS = (16, 8, 4)
GPU_MARGIN = 512 << 20  # left free for the CUDA context and allocator slack by the defaults
CPU_MARGIN = 4 << 30
PREFILL_CHUNK = 512
# Hit rate of the device cache holding a fraction f of all experts, demand paging. Measured with
# `localglm simulate` on traces of a trained tiny model (benchmarks/bench_offload.py): routing that
# the load-balancing bias keeps even gives about f (LFU/stat policies; Belady reaches ~3x at 10%).
# Prefetch of predicted experts raised it to 61-80% at 10-50% there but is not counted here, so the
# tok/s below is a conservative estimate. Replace with a curve from your own traces when you have them.
HIT_CURVE = ((0.0, 0.0), (0.1, 0.09), (0.2, 0.195), (0.3, 0.306), (0.4, 0.409), (0.5, 0.506), (1.0, 1.0))

def interpolate_hit_rate(fraction: float, curve=HIT_CURVE) -> float:
    f = min(1.0, max(0.0, fraction))
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if f <= x1:
            return y0 + (y1 - y0) * (f - x0) / (x1 - x0)
    return 1.0


def default_gpu_mem() -> int:
    """Free GPU memory less a margin; 0 without a CUDA GPU (without NVIDIA's driver loaded, known
    without importing torch: `plan` starts fast on CPU-only machines)."""
    if not Path("/proc/driver/nvidia").exists() and Path("/proc").is_dir():
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info()
    return max(0, free - GPU_MARGIN)


def available_ram() -> int:
    """RAM the OS could give this process now (MemAvailable; all of RAM where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_cpu_mem() -> int:
    return max(0, available_ram() - CPU_MARGIN)


@dataclass(frozen=True)
class MtpPlacement:
    """An MTP (next-n) block planned beside the model (models/mtp.py): the bits of its always-used weights
    (16: the compute dtype; the recipe class "mtp", 8 by default) and of its routed experts, and whether
    it holds its own embedding / head (else it reads the main model's). Its always-used weights and KV
    cache go on the GPU; its routed experts are one more MoE layer of the offloaded backend: in host RAM,
    streamed through the expert cache (slots of their own size where it differs from the main experts')."""

    bits: float = 8
    expert_bits: float = 8
    own_embed: bool = False
    own_head: bool = False


@dataclass
class PlanItem:
    what: str
    where: str  # "GPU", "RAM (pinned)", "RAM", "disk (mmap)"
    bytes: int


@dataclass
class Plan:
    model: str
    gpu_budget: int
    cpu_budget: int
    ctx: int
    expert_bits: float
    expert_bytes: int
    n_experts_total: int
    cache_slots: int
    experts_in_ram: int
    experts_on_disk: int
    hit_rate: float
    decode_tok_s: float
    prefill_tok_s: float
    bandwidths: Bandwidths
    items: list[PlanItem] = field(default_factory=list)
    dense_bits: dict[str, float] = field(default_factory=dict)  # recipe class -> bits (16 = float; a fraction: a GGUF type's)
    chosen: list[str] = field(default_factory=list)  # the classes the planner lowered below float to fit
    picked: list[str] = field(default_factory=list)  # every class whose bits the planner chose (the others were given)
    kv_in_ram: bool = False  # the KV cache's hostable part (DSA's latent rows) lives in pinned RAM
    kv_gather_bytes: int = 0  # with kv_in_ram: bytes gathered to the GPU per decoded token
    mtp_layer: int | None = None  # the MTP block's layer when it was planned (its experts are in n_experts_total)
    mtp_bytes: int = 0  # its always-used weights and KV cache on the device
    mtp_expert_bytes: int = 0  # one of its routed experts
    mtp_cache_slots: int = 0  # expert-cache slots of its own size (0 where they are the main experts' size: in cache_slots)
    slot_bytes: int = 0  # GPU bytes of one expert-cache slot: the blob and the CUDA kernels' copy of it
    mtp_left_out: str = ""  # why a block speculation would have used by default was left out of this plan
    mtp_lowered: str = ""  # with --mtp: the always-used weights' precision without the block, where placing it lowered it
    expert_ram_bytes: int = 0  # host RAM for routed experts (the hottest that fit go there, the rest stay mapped)

    @property
    def cpu_only(self) -> bool:
        return self.gpu_budget <= 0

    def used(self, where: str) -> int:
        return sum(i.bytes for i in self.items if i.where.startswith(where))

    def table(self) -> str:
        rows = [f"{'what':<40} {'where':<14} {'GB':>9}"]
        for it in self.items:
            rows.append(f"{it.what:<40} {it.where:<14} {it.bytes / 1e9:9.3f}")
        rows.append("")
        if not self.cpu_only:
            rows.append(f"GPU   {human_bytes(self.used('GPU')):>12} of {human_bytes(self.gpu_budget)}")
        rows.append(f"RAM   {human_bytes(self.used('RAM')):>12} of {human_bytes(self.cpu_budget)}")
        if self.experts_on_disk:
            rows.append(f"disk  {human_bytes(self.used('disk')):>12} memory-mapped ({self.experts_on_disk} experts)")
        slots = self.cache_slots + self.mtp_cache_slots
        pct = 100 * slots / self.n_experts_total if self.n_experts_total else 0
        if not self.cpu_only:
            rows.append(
                f"expert cache: {slots} of {self.n_experts_total} routed experts ({pct:.1f}%) on the GPU, "
                f"{human_bytes(self.expert_bytes)} each at {self.expert_bits:.3g} bits/weight; est. hit rate {100 * self.hit_rate:.0f}%"
            )
        else:
            rows.append(f"CPU-only plan: {self.n_experts_total} routed experts of {human_bytes(self.expert_bytes)} ({self.expert_bits:.3g} bits/weight)")
        if self.kv_in_ram:
            rows.append(
                f"KV cache: latent rows in pinned RAM, indexer keys on the GPU; each decoded token gathers its top-k rows "
                f"({human_bytes(self.kv_gather_bytes)} over PCIe), which left {self.cache_slots} expert slots on the GPU"
            )
        if self.dense_bits:
            rows.append("always-used weights: " + precision_note(self.dense_bits, self.chosen, self.picked))
        if self.mtp_layer is not None:
            slots = f"{self.mtp_cache_slots} slots of their own" if self.mtp_cache_slots else "sharing its slots"
            rows.append(
                f"MTP block (layer {self.mtp_layer}, speculative drafts): {human_bytes(self.mtp_bytes)} of always-used weights and KV cache "
                + ("in RAM" if self.cpu_only else "on the GPU")
                + f"; its routed experts ({human_bytes(self.mtp_expert_bytes)} each) are counted with the others"
                + ("" if self.cpu_only else f" and go through the expert cache ({slots}); --no-mtp leaves it out")
            )
        if self.mtp_left_out:
            rows.append(f"MTP block left out (no speculative drafts): {self.mtp_left_out}")
        if self.mtp_lowered:
            rows.append(f"the MTP block takes the room of more precise always-used weights: --no-mtp gives {self.mtp_lowered}")
        b = self.bandwidths
        rows.append(
            f"predicted: decode {self.decode_tok_s:.1f} tok/s, prefill {self.prefill_tok_s:.0f} tok/s "
            f"(cost model; h2d {b.h2d / 1e9:.0f} GB/s, RAM {b.ram / 1e9:.0f} GB/s, CPU {b.cpu_flops / 1e12:.2f} TFLOP/s"
            + (", measured: " + ", ".join(b.measured) if b.measured else ", assumed")
            + ("; with the GPU path's host time per layer and expert, as measured on an H200 run" if not self.cpu_only else "")
            + ")"
        )
        return "\n".join(rows)


def bits_per_weight(bits: int | float, k: int) -> float:
    """Stored bits per weight of a localglm format (int 2, 4, 8: q2 / q4 / q8 with their scales, rows
    of k values) or of a float (16), or `bits` itself when it is a (float) bits-per-weight figure."""
    if isinstance(bits, int) and bits in (2, 4, 8):
        from quant.spec import QuantSpec

        spec = QuantSpec.for_bits(int(bits))
        return spec.bits_per_weight((1, max(spec.group, k - k % spec.group)))
    return float(bits)


# The host's share of a GPU step, measured on the first GPU run (H200 host, GLM-4.5-Air's shape, cProfile of
# the decode loop; BENCHMARKS.md "GPU check"): per layer (attention, norms, router, the next-layer
# predictor's host syncs), per expert run from the cache (Python dispatch, its copy's wait and event), and
# per expert copied in (building its tinygemm kernel). The layers' host syncs serialise them with the GPU's
# work, so they add to the bandwidth model's time; they are what bounds the GPU path today (3-4% of the
# PCIe bound measured), until a decode step runs as a CUDA graph.
GPU_HOST_LAYER_S = 2.9e-3
GPU_HOST_EXPERT_S = 0.26e-3  # 8 experts a layer: 2.9 ms of backend time less 0.8 ms of kernel builds
GPU_HOST_PREPARE_S = 0.95e-3


def gpu_host_s(layers: int, experts_run: float, experts_copied: float) -> float:
    """Seconds of host-side work in one GPU step (GPU_HOST_* above)."""
    return layers * GPU_HOST_LAYER_S + experts_run * GPU_HOST_EXPERT_S + experts_copied * GPU_HOST_PREPARE_S


def cuda_copy_bytes(bits: int | float, shapes: list[tuple[int, int]], float_bits: float) -> int:
    """GPU bytes localglm's CUDA kernels keep beside the stored form of weights of these shapes at `bits`
    (quant.spec.cuda_prepared_nbytes: tinygemm's int4 tiles for q2/q4 in a bf16 model, a dense copy
    in the compute dtype for q8); 0 for floats and for bits-per-weight figures (GGUF blocks)."""
    if not (isinstance(bits, int) and bits in (2, 4, 8)):
        return 0
    from quant.spec import QuantSpec, cuda_prepared_nbytes

    spec = QuantSpec.for_bits(bits)
    return sum(cuda_prepared_nbytes(spec, shape, max(1, int(float_bits) // 8)) for shape in shapes)


def bits_list(bits: dict[str, float]) -> str:
    """'attn q8, shared bf16, ...': each class's format, or its bits per weight where no format has them."""
    name = {16: "bf16", 8: "q8", 4: "q4", 2: "q2"}
    return ", ".join(f"{c} {name.get(b, b) if float(b).is_integer() else f'{b:.2f} bits/weight'}" for c, b in bits.items())


def precision_note(bits: dict[str, float], chosen: list[str], picked: list[str] | None = None) -> str:
    """'attn q8, shared q8, ... (chosen to fit; --attn etc. override)' for a plan's table. `picked`: the classes
    the planner set (left in float where that fits: "(as given)" there was wrong, nobody had given them)."""
    parts = bits_list(bits)
    if not chosen and picked:
        return parts + f" (the planner's: float fits; --{' --'.join(c.replace('_', '-') for c in picked)} override)"
    if not chosen:
        return parts + (" (as given)" if all(float(b).is_integer() for b in bits.values()) else " (as given or stored)")
    return parts + f" (the planner chose {', '.join(chosen)}: the most precise that fits; --{' --'.join(c.replace('_', '-') for c in chosen)} override)"


class BudgetTooSmall(LocalGLMError):
    """No placement fits the budgets (one line, with the minimum that would work)."""


def plan_with_mtp(cfg: ModelConfig, *args: object, mtp: MtpPlacement | None, required: bool, **kw: object) -> Plan:
    """`make_plan(cfg, *args, **kw)` with an MTP block. Asked for (`required`: --mtp), it is placed or the
    plan fails with what it needs. By default (speculation on where the checkpoint has the block) it is
    placed only where it fits beside the model with the always-used weights at the precision they would
    have without it; else the plan leaves it out and says why (`Plan.mtp_left_out`)."""
    if mtp is None:
        return make_plan(cfg, *args, **kw)  # type: ignore[arg-type]
    if required:
        plan = make_plan(cfg, *args, mtp=mtp, **kw)  # type: ignore[arg-type]
        try:
            without = make_plan(cfg, *args, **kw)  # type: ignore[arg-type]
        except BudgetTooSmall:
            return plan
        if plan.dense_bits != without.dense_bits:  # greedy output then differs from --no-mtp's: say why
            plan.mtp_lowered = bits_list(without.dense_bits)
        return plan
    without = make_plan(cfg, *args, **kw)  # type: ignore[arg-type]
    try:
        plan = make_plan(cfg, *args, mtp=mtp, **kw)  # type: ignore[arg-type]
    except BudgetTooSmall:
        without.mtp_left_out = f"it does not fit beside the model in --gpu-mem {human_bytes(without.gpu_budget)} (--mtp: what it needs)"
        return without
    if plan.dense_bits != without.dense_bits:
        without.mtp_left_out = "it fits only with the always-used weights at a lower precision (--mtp places it so)"
        return without
    return plan


def make_plan(
    cfg: ModelConfig,
    gpu_mem: int | str | None = None,
    cpu_mem: int | str | None = None,
    ctx: int = 4096,
    experts: int | float = 4,
    bandwidths: Bandwidths | None = None,
    model: str = "",
    fixed: dict[str, float] | None = None,
    float_bits: float = 16.0,
    kv: str = "auto",
    mtp: MtpPlacement | None = None,
) -> Plan:
    """Plan a placement; raises LocalGLMError (one line, with the minimum that would work) if none fits.

    `experts`: routed-expert bits (2, 4, 8: localglm's formats; 16: bf16) or a bits-per-weight figure.
    `fixed`: recipe class -> bits the user chose for always-used weights; the other classes of
    DENSE_CLASSES get the most precise level of DENSE_LEVELS that fits. 16 means kept in float, at
    `float_bits` per weight (the compute dtype's: 32 for an fp32 model).
    `kv`: where the KV cache lives with a GPU: "gpu"; "ram" (only for attention that reads a selection
    of rows per token, GLM-5's DSA: the latent rows in pinned RAM, each step's top-k gathered to the
    GPU, the indexer keys on the GPU); "auto" plans both and keeps the faster that fits.
    `mtp`: an MTP block to place too (its always-used weights and KV cache beside the model's, its
    routed experts with theirs); None where the config has none or speculation is off."""
    gpu = parse_size(gpu_mem, "--gpu-mem")
    cpu = parse_size(cpu_mem, "--cpu-mem")
    gpu = default_gpu_mem() if gpu is None else gpu
    cpu_given = cpu is not None  # a refusal says what the default was, since nobody typed it
    cpu = default_cpu_mem() if cpu is None else cpu
    if gpu < 0 or cpu < 0:
        raise LocalGLMError("memory budgets must not be negative")
    if ctx < 1:
        raise LocalGLMError(f"--ctx must be at least 1, got {ctx}")
    if not 1 <= float(experts) <= 32:
        raise LocalGLMError(f"--experts: {experts} bits is not a format (use 2, 4, 8 or 16)")
    given = dict(fixed or {})
    free = [c for c in DENSE_CLASSES if c not in given]
    if kv not in KV_PLACES:
        raise LocalGLMError(f"--kv {kv!r}: use one of {', '.join(KV_PLACES)}")
    hostable = hostable_kv(cfg) if gpu > 0 else None
    if kv == "ram" and hostable is None:
        why = "a CPU-only plan keeps it in RAM already" if gpu <= 0 else "its attention reads every cached row each token"
        raise LocalGLMError(f"--kv ram: this model's KV cache cannot be kept in RAM apart from the GPU ({why}); use --kv auto")
    places = [False, True] if hostable is not None and kv == "auto" else [kv == "ram"]
    error: BudgetTooSmall | None = None
    for level in DENSE_LEVELS if free else (None,):
        dense_bits = {c: given.get(c, level) for c in DENSE_CLASSES}
        fits: list[Plan] = []
        for kv_in_ram in places:
            try:
                fits.append(_plan(cfg, gpu, cpu, ctx, experts, bandwidths or Bandwidths(), dense_bits, float_bits, model, kv_in_ram, mtp, cpu_given))
            except BudgetTooSmall as exc:
                error = exc
        if not fits:
            continue
        plan = max(fits, key=lambda p: p.decode_tok_s)  # where the KV cache lives: the faster placement that fits
        plan.chosen = [c for c in free if dense_bits[c] != 16]
        plan.picked = list(free)
        return plan
    assert error is not None
    raise error


def _plan(
    cfg: ModelConfig, gpu: int, cpu: int, ctx: int, experts: float, bw: Bandwidths, dense_bits: dict[str, float], float_bits: float, model: str,
    kv_in_ram: bool = False,
    mtp: MtpPlacement | None = None,
    cpu_given: bool = True,
) -> Plan:
    c = count_params(cfg)
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    bits = _expert_bits(h, inter, experts)
    expert_bytes = _expert_bytes(h, inter, experts)
    expert_shapes = [(2 * inter, h), (h, inter)]
    # a GPU cache slot holds the blob (what moves) and the kernels' copy made from it (quant.spec.cuda_prepared_nbytes)
    slot_bytes = expert_bytes + (cuda_copy_bytes(experts, expert_shapes, float_bits) if gpu > 0 else 0)
    n_total = cfg.num_moe_layers * cfg.n_routed_experts
    kv = kv_cache_bytes(cfg, ctx)
    workspace = PREFILL_CHUNK * (cfg.vocab_size + 4 * h + 2 * max(cfg.intermediate_size, inter * cfg.num_experts_per_tok)) * 4
    main_dev = "RAM" if gpu <= 0 else "GPU"
    hostable = hostable_kv(cfg)
    # Per decoded token, the KV bytes attention reads: with a selection (DSA), the indexer keys and the
    # top-k rows; otherwise about half the cache on average over a generation.
    kv_read = kv - hostable.bytes_per_token * ctx + hostable.gather_bytes(ctx) if hostable else kv // 2
    kv_host = gather = 0
    if kv_in_ram:
        assert hostable is not None and gpu > 0
        kv_host, gather = hostable.bytes_per_token * ctx, hostable.gather_bytes(ctx)
        workspace += ctx * hostable.row_bytes  # a prefill chunk reads one layer's rows at a time, brought whole

    def size(params: int, cls: str) -> int:
        """Bytes of a class where it lives: on the GPU a quantized matrix's kernel copy too (not the
        embedding's: rows are looked up, never multiplied); per weight as for rows of `h`."""
        bits = dense_bits[cls]
        stored = params * (float_bits if bits == 16 else bits_per_weight(bits, h)) / 8
        if main_dev == "GPU" and cls != "embed":
            stored += params * cuda_copy_bytes(bits, [(8, h)], float_bits) / (8 * h)
        return int(stored)

    items = [
        PlanItem("embeddings", main_dev, size(c.embed, "embed")),
        PlanItem(f"attention ({cfg.num_hidden_layers} layers)", main_dev, size(c.attention, "attn")),
        PlanItem("norms", main_dev, int(c.norms * float_bits / 8)),
        PlanItem(f"routers ({cfg.num_moe_layers} MoE layers, fp32)", main_dev, c.router * 4),
        PlanItem("shared experts", main_dev, size(c.shared_experts, "shared")),
        PlanItem(f"dense MLP layers ({cfg.first_k_dense_replace})", main_dev, size(c.dense_mlp, "dense")),
        PlanItem("lm_head", main_dev, size(c.lm_head, "lm_head")),
        PlanItem(f"KV cache ({ctx} tokens, bf16)", main_dev, kv)
        if not kv_in_ram
        else PlanItem(f"KV cache: indexer keys ({ctx} tokens)", "GPU", kv - kv_host),
        PlanItem("workspace (activations, logits)", main_dev, workspace),
    ]
    fixed = sum(i.bytes for i in items)
    block = cfg.num_hidden_layers if mtp is not None and cfg.num_nextn_predict_layers > 0 else None
    n_mtp = cfg.n_routed_experts if block is not None else 0
    mtp_bytes = mtp_expert = 0
    if block is not None:
        assert mtp is not None
        mtp_weights, mtp_kv = _mtp_dense_bytes(cfg, mtp, float_bits, on_gpu=gpu > 0), kv_cache_bytes(cfg.mtp_block_config(), ctx)
        items.append(PlanItem(f"MTP block (layer {block}, {_bits_name(mtp.bits)})", main_dev, mtp_weights))
        items.append(PlanItem(f"MTP block KV cache ({ctx} tokens, bf16)", main_dev, mtp_kv))
        mtp_bytes = mtp_weights + mtp_kv
        mtp_expert = _expert_bytes(h, inter, mtp.expert_bits)
    mtp_slot = mtp_expert + (cuda_copy_bytes(mtp.expert_bits, expert_shapes, float_bits) if gpu > 0 and mtp is not None and block is not None else 0)
    n_main = n_total
    n_total += n_mtp
    if kv_in_ram:
        items.append(PlanItem(f"KV cache: latent rows ({ctx} tokens)", "RAM (pinned)", kv_host))
    k = cfg.num_experts_per_tok
    slots = mtp_slots = 0
    cpu_fixed = 0
    own_size = bool(n_mtp) and mtp_expert != expert_bytes  # the block's experts need slots of their own size
    if gpu > 0:
        min_slots = 2 * k  # one layer's experts in use plus the next layer's arriving
        min_mtp = k if own_size else 0  # one draft token's experts
        need = fixed + mtp_bytes + min_slots * slot_bytes + min_mtp * mtp_slot
        if gpu < need:
            raise BudgetTooSmall(
                f"--gpu-mem {human_bytes(gpu)} is too small for this model at --ctx {ctx}"
                + (" with its MTP block" if n_mtp else "")
                + f": needs at least {human_bytes(need, up=True)} "
                f"(always-used weights + KV cache + workspace {human_bytes(fixed)}, "
                + (f"MTP block {human_bytes(mtp_bytes)}, " if n_mtp else "")
                + f"{min_slots + min_mtp} expert slots {human_bytes(need - fixed - mtp_bytes)}); "
                f"lower --ctx, " + ("or --no-mtp, " if n_mtp else "") + "or use --gpu-mem 0 for CPU-only"
            )
        if own_size:
            slots, mtp_slots = split_slots(gpu - fixed - mtp_bytes, n_main, slot_bytes, n_mtp, mtp_slot, k)
        else:
            slots = min(n_total, (gpu - fixed - mtp_bytes) // slot_bytes)
        items.append(PlanItem(f"expert cache ({slots} slots)", "GPU", slots * slot_bytes))
        if mtp_slots:
            items.append(PlanItem(f"MTP expert cache ({mtp_slots} slots)", "GPU", mtp_slots * mtp_slot))
        staging = 2 * k * expert_bytes  # pinned staging for experts read from disk
        cpu_fixed = staging + kv_host
        ram_where = "RAM (pinned)"
    else:
        cpu_fixed = fixed + mtp_bytes
        ram_where = "RAM"
    min_cpu = cpu_fixed + (0 if gpu > 0 else k * max(expert_bytes, mtp_expert))
    if cpu < min_cpu:
        what = ("staging buffers" + (" and the KV cache's latent rows" if kv_host else "")) if gpu > 0 else "always-used weights + KV cache + workspace + one token's experts"
        raise BudgetTooSmall(
            (f"--cpu-mem {human_bytes(cpu)}" if cpu_given else f"--cpu-mem (not given: the available RAM less 4 GiB, now {human_bytes(cpu)})")
            + f" is too small: needs at least {human_bytes(min_cpu, up=True)} ({what}); "
            f"the rest of the experts can stay memory-mapped on disk" + ("" if cpu_given else "; free some memory or pass --cpu-mem SIZE")
        )
    # Host RAM takes the hottest experts that fit, the main model's first, each at its own size (the MTP block's are
    # wider at 8 bits: counted at the main size, a plan "fitting" all of them went past --cpu-mem).
    all_bytes = n_main * expert_bytes + n_mtp * mtp_expert
    room = cpu - cpu_fixed
    if all_bytes <= room:
        in_ram, ram_bytes = n_total, all_bytes
    else:
        main_in = min(n_main, room // expert_bytes)
        mtp_in = min(n_mtp, (room - main_in * expert_bytes) // mtp_expert) if n_mtp else 0
        in_ram, ram_bytes = main_in + mtp_in, main_in * expert_bytes + mtp_in * mtp_expert
    on_disk = n_total - in_ram
    if gpu > 0:
        items.append(PlanItem("expert staging (2 layers' experts)", "RAM (pinned)", cpu_fixed - kv_host))
    mtp_note = f", {n_mtp} MTP" if n_mtp else ""
    items.append(PlanItem(f"routed experts ({in_ram} of {n_total}{mtp_note})", ram_where, ram_bytes))
    if on_disk:
        items.append(PlanItem(f"routed experts ({on_disk} coldest)", "disk (mmap)", all_bytes - ram_bytes))

    flops = 2 * 3 * h * inter
    cm = CostModel(bw, expert_bytes, flops)
    disk_share = on_disk / n_total if n_total else 0.0  # assume misses land on disk in proportion (pessimistic)
    dense_bytes = fixed - workspace - (kv - kv_host) + kv_read - gather  # weights and KV read from device memory per token
    active_other = c.always_used - c.embed  # FLOPs: every always-used weight but the embedding lookup
    per_layer_k = cfg.num_moe_layers * k
    if gpu > 0:
        sharing = n_main if mtp_slots else n_total  # the experts the main slots serve (none: a model without MoE layers)
        hit = interpolate_hit_rate(slots / sharing) if sharing else 1.0
        miss = (1 - disk_share) * cm.miss_s(1) + disk_share * cm.miss_s(1, on_disk=True)
        decode_s = dense_bytes / bw.gpu_mem + gather / bw.h2d + per_layer_k * (hit * cm.gpu_s(1) + (1 - hit) * miss)
        copies = cm.copy_s() + cm.gpu_s(1) <= cm.cpu_s(1)  # the cost model's miss path: copy in, or run on the CPU
        decode_s += gpu_host_s(cfg.num_hidden_layers, per_layer_k, (1 - hit) * per_layer_k if copies else 0.0)
        # Prefill: each layer streams every expert it needs (about all of them at 512 tokens) unless cached.
        t = PREFILL_CHUNK
        tok_per_expert = max(1, t * k // cfg.n_routed_experts)
        hit_pf = min(1.0, slots / n_main) if n_main else 1.0
        stream = (1 - hit_pf) * n_main * (cm.copy_s() + disk_share * expert_bytes / bw.disk)
        compute = n_main * cm.gpu_s(tok_per_expert) + 2 * active_other * t / bw.gpu_flops
        prefill_s = max(stream, compute) + gpu_host_s(cfg.num_hidden_layers, n_main, (1 - hit_pf) * n_main)
    else:
        hit = 0.0
        decode_s = dense_bytes / bw.ram + per_layer_k * ((1 - disk_share) * cm.cpu_s(1) + disk_share * cm.cpu_s(1, on_disk=True))
        t = PREFILL_CHUNK
        tok_per_expert = max(1, t * k // cfg.n_routed_experts)
        prefill_s = n_main * cm.cpu_s(tok_per_expert, on_disk=disk_share > 0.5) + 2 * active_other * t / bw.cpu_flops
    return Plan(
        model=model, gpu_budget=gpu, cpu_budget=cpu, ctx=ctx, expert_bits=bits, expert_bytes=expert_bytes, slot_bytes=slot_bytes if gpu > 0 else 0,
        n_experts_total=n_total, cache_slots=int(slots), experts_in_ram=int(in_ram), experts_on_disk=int(on_disk),
        hit_rate=hit, decode_tok_s=1.0 / decode_s if decode_s > 0 else 0.0,
        prefill_tok_s=PREFILL_CHUNK / prefill_s if prefill_s > 0 else 0.0, bandwidths=bw, items=items,
        dense_bits={k: int(v) if float(v).is_integer() else round(float(v), 4) for k, v in dense_bits.items()}, kv_in_ram=kv_in_ram, kv_gather_bytes=gather,
        mtp_layer=block, mtp_bytes=mtp_bytes, mtp_expert_bytes=mtp_expert, mtp_cache_slots=int(mtp_slots), expert_ram_bytes=cpu - cpu_fixed,
    )  # fmt: skip


def _expert_bits(h: int, inter: int, experts: float) -> float:
    """Stored bits per weight of one routed expert: gate_up's rows are h long, down's inter."""
    return (2 * bits_per_weight(experts, h) + bits_per_weight(experts, inter)) / 3


def _expert_bytes(h: int, inter: int, experts: float) -> int:
    return int(3 * h * inter * _expert_bits(h, inter, experts) / 8)


def _bits_name(bits: float) -> str:
    return {16: "bf16", 8: "q8", 4: "q4", 2: "q2"}.get(bits, f"{bits:.3g} bits/weight")  # type: ignore[call-overload]


def _mtp_dense_bytes(cfg: ModelConfig, mtp: MtpPlacement, float_bits: float, on_gpu: bool = False) -> int:
    """The MTP block's always-used weights: eh_proj, enorm/hnorm, its decoder layer's attention, norms,
    router (fp32) and shared expert, and its own embedding / head where it has them; on the GPU with the
    CUDA kernels' copies of its quantized matrices (cuda_copy_bytes)."""
    c = count_params(cfg.mtp_block_config())
    h = cfg.hidden_size
    per = float_bits if mtp.bits == 16 else bits_per_weight(mtp.bits, h)
    multiplied = 2 * h * h + c.attention + c.shared_experts + (c.embed if mtp.own_head else 0)
    params = multiplied + (c.embed if mtp.own_embed else 0)
    copies = multiplied * cuda_copy_bytes(mtp.bits, [(8, h)], float_bits) / (8 * h) if on_gpu else 0
    return int(params * per / 8 + copies + (c.norms + 2 * h) * float_bits / 8 + c.router * 4)


def split_slots(budget: int, n_main: int, main_bytes: int, n_mtp: int, mtp_bytes: int, top_k: int) -> tuple[int, int]:
    """Expert-cache slots for the main experts and for an MTP block's of another size, from `budget`
    bytes: the same share of each where it can (the block reads its k experts once per drafted token,
    about what one main layer reads), the block at least `top_k` (one draft's experts)."""
    share = budget / max(1, n_main * main_bytes + n_mtp * mtp_bytes)
    mtp = min(n_mtp, max(top_k, int(share * n_mtp)))
    return max(0, min(n_main, (budget - mtp * mtp_bytes) // main_bytes)), mtp
