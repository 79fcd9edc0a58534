"""Parameter counts and memory footprints computed from config.json alone (no weights read).

Used by `localglm inspect`, and by the placement planner to size tiers before anything loads.
"""

from __future__ import annotations

import re

from .config import ModelConfig
from .errors import LocalGLMError
from .models import arch_of
from .models.param_counts import ParamCounts

# Bits per weight of whole formats, scales included (see quant/ and GLM_REFERENCE.md).
PRECISIONS: dict[str, float] = {"bf16": 16.0, "fp8": 8.0 + 32 / (128 * 128), "8-bit": 8.5, "4-bit": 4.5, "2-bit": 2.625}


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of the model `cfg` describes (its architecture's formulas)."""
    return arch_of(cfg).sizes.count_params(cfg)


def memory_bytes(counts: ParamCounts, expert_bits: float, other_bits: float = 16.0) -> int:
    """Weight bytes with routed experts at `expert_bits` and everything else at `other_bits`."""
    return int(counts.routed_experts * expert_bits / 8 + counts.always_used * other_bits / 8)


def kv_cache_bytes(cfg: ModelConfig, tokens: int, bytes_per_value: int = 2) -> int:
    """The KV cache (in the architecture's own layout) for `tokens` tokens."""
    return arch_of(cfg).sizes.kv_bytes_per_token(cfg, bytes_per_value) * tokens


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.I)


def parse_size(text: str | int | float | None, what: str = "size") -> int | None:
    """'24GiB', '24G', '24GB' (GB = 10^9, GiB and bare G = 2^30), '512MiB', or a byte count."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise LocalGLMError(f"{what}: cannot read {text!r} as a size (use e.g. 24GiB, 512MiB or a byte count)")
    num, unit, i, b = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4)
    power = " kmgt".index(unit) if unit else 0
    base = 1000 if (b and not i) else 1024
    return int(num * base**power)


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def describe(cfg: ModelConfig, ctx: int = 4096) -> str:
    """The text `localglm inspect` prints."""
    c = count_params(cfg)
    lines = [
        f"architecture      {cfg.model_type}: {cfg.num_hidden_layers} layers "
        f"({cfg.first_k_dense_replace} dense, {cfg.num_moe_layers} MoE) + {cfg.num_nextn_predict_layers} MTP",
        f"hidden            {cfg.hidden_size}, vocab {cfg.vocab_size}",
        f"attention         {arch_of(cfg).sizes.describe_attention(cfg)}",
        f"experts           {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, groups {cfg.n_group}/{cfg.topk_group}) "
        f"+ {cfg.n_shared_experts} shared, width {cfg.moe_intermediate_size}, scale {cfg.routed_scaling_factor:g}",
        f"dense FFN         width {cfg.intermediate_size}",
        "",
        f"parameters total  {human_count(c.total)}",
        f"active per token  {human_count(c.active)}",
        f"routed experts    {human_count(c.routed_experts)} ({100 * c.routed_share:.1f}% of all weights); "
        f"one expert {human_bytes(3 * cfg.hidden_size * cfg.moe_intermediate_size * 2)} in bf16",
        f"always used       {human_count(c.always_used)} (embeddings, attention, norms, routers, shared experts, dense, lm_head)",
        "",
        "memory (weights)  experts at / rest in bf16:",
    ]
    for name, bits in PRECISIONS.items():
        lines.append(f"  {name:<8}        {human_bytes(memory_bytes(c, bits)):>12}   (everything at {name}: {human_bytes(c.total * bits / 8)})")
    lines.append(f"KV cache          {human_bytes(kv_cache_bytes(cfg, ctx))} for {ctx} tokens in bf16")
    return "\n".join(lines)
