"""Parameter counts and memory footprints from a checkpoint's description alone (no weights read).

Used by `localglm inspect` and `localglm plan`, and by the placement planner to size tiers before
anything loads. `read_checkpoint` takes any input the loader takes (a Hugging Face directory, a
localglm quantized directory, a GGUF file) and reports the config and, for the last two, what
precision the weights are actually stored in, so plans use the real bits.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .errors import LocalGLMError

if TYPE_CHECKING:
    from .models.arch import Arch
    from .models.param_counts import HostableKV, ParamCounts


def arch_of(cfg: ModelConfig) -> Arch:
    """The registry's entry for cfg, imported on first use: parse_size and human_bytes, which every
    command's flags use, need no registry (`localglm --version` and `--help` start faster)."""
    from .models import arch_of as lookup

    return lookup(cfg)

# Bits per weight of whole formats, scales included: bf16; fp8 with one fp32 scale per 128x128 block;
# llama.cpp's Q8_0 (8.5) and Q4_K/Q2_K-class formats; localglm's q8/q4/q2 are within 0.1 bit of these.
PRECISIONS: dict[str, float] = {"bf16": 16.0, "fp8": 8.0 + 32 / (128 * 128), "8-bit": 8.5, "4-bit": 4.5, "2-bit": 2.625}
# The recipe classes of the always-used weights (those a plan keeps on the device, at a precision it may choose).
DENSE_CLASSES = ("attn", "shared", "dense", "embed", "lm_head")
KV_PLACES = ("auto", "gpu", "ram")  # the KV cache's place when offloading (--kv)
# The context `generate`, `chat`, `serve` and `plan` use when --ctx is not given: this, or the model's maximum if smaller.
DEFAULT_CTX = 4096


def default_ctx(cfg: ModelConfig) -> int:
    """The context used when none is given: min(DEFAULT_CTX, the model's max_position_embeddings)."""
    return min(DEFAULT_CTX, cfg.max_position_embeddings)


def check_ctx(cfg: ModelConfig, ctx: int, where: str = "the model") -> None:
    """Refuse a context below 2 tokens or above max_position_embeddings.

    Why refuse rather than warn: localglm implements plain RoPE only (no YaRN or other scaling), so
    positions past the trained maximum are out of distribution and the output degrades silently."""
    if ctx < 2:
        raise LocalGLMError(f"--ctx must be at least 2 tokens, got {ctx}")
    if ctx > cfg.max_position_embeddings:
        raise LocalGLMError(
            f"--ctx {ctx} is above {where}'s max_position_embeddings {cfg.max_position_embeddings} (the context it was "
            "trained for; localglm implements no RoPE scaling to go past it)"
        )


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of the model `cfg` describes (its architecture's formulas)."""
    return arch_of(cfg).sizes.count_params(cfg)


def memory_bytes(counts: ParamCounts, expert_bits: float, other_bits: float = 16.0) -> int:
    """Weight bytes with routed experts at `expert_bits` and everything else at `other_bits`."""
    return int(counts.routed_experts * expert_bits / 8 + counts.always_used * other_bits / 8)


def kv_cache_bytes(cfg: ModelConfig, tokens: int, bytes_per_value: int = 2) -> int:
    """The KV cache (in the architecture's own layout) for `tokens` tokens."""
    return arch_of(cfg).sizes.kv_bytes_per_token(cfg, bytes_per_value) * tokens


def hostable_kv(cfg: ModelConfig, bytes_per_value: int = 2) -> HostableKV | None:
    """The part of the KV cache that may live in host RAM (its architecture's; None for most)."""
    return arch_of(cfg).sizes.hostable_kv(cfg, bytes_per_value)


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
    if power == 0 and not num.is_integer():  # "--gpu-mem 0.5" was 0 bytes: quietly a CPU-only plan
        raise LocalGLMError(f"{what} {text}: bytes are counted whole; give a unit (e.g. {m.group(1)}GiB)")
    base = 1000 if (b and not i) else 1024
    return int(num * base**power)


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def human_bytes(n: float, up: bool = False) -> str:
    """'1.23 GiB'; `up` rounds up instead of to nearest, for minimums (a stated minimum must be enough)."""
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{(math.ceil(n / div * 100) / 100 if up else n / div):.2f} {unit}"
    return f"{math.ceil(n) if up else int(n)} B"


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


@dataclass(frozen=True)
class StoredPrecision:
    """What a quantized directory or a GGUF actually holds: the routed experts' bits per weight (scales
    included) and, where the checkpoint fixes them, the always-used classes' bits (16 = float)."""

    expert_bits: float
    class_bits: dict[str, float] = field(default_factory=dict)
    label: str = ""  # e.g. "experts q2 (2.56 bits/weight), attn q8, ..." or "experts Q4_K (4.50 bits/weight)"


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as `inspect` and `plan` see it: config, format, stored precision, bytes on disk."""

    config: ModelConfig
    kind: str  # "safetensors" | "quantized" | "gguf"
    disk_bytes: int
    stored: StoredPrecision | None = None


def read_checkpoint(path: str | Path) -> CheckpointInfo:
    """Config and stored precision of a Hugging Face directory (or its config.json), a localglm quantized
    directory, or a GGUF file (any part of a split set); weights are not read, only headers."""
    from .checkpoint.kinds import is_gguf_path, is_quantized_dir

    p = Path(path).expanduser()
    if is_gguf_path(p):
        return _gguf_info(p)
    if p.is_dir() and is_quantized_dir(p):
        return _quantized_info(p)
    cfg = ModelConfig.from_file(p)
    root = p if p.is_dir() else p.parent
    return CheckpointInfo(cfg, "safetensors", sum(f.stat().st_size for f in root.glob("*.safetensors") if f.is_file()))


def _quantized_info(root: Path) -> CheckpointInfo:
    from .checkpoint.quantized_dir import QuantizedSource

    cfg = ModelConfig.from_file(root)
    with QuantizedSource(root, verify=False) as q:  # headers and manifest only; loading checks the CRCs
        weights = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        count = sum(q.n_experts.get(layer, 0) for layer in q.layouts)
        expert_bits = 8 * q.expert_bytes() / (count * weights) if count else 16.0
        formats = sorted({spec.name for lay in q.layouts.values() for spec in (lay.gate_up, lay.down)}) or ["bf16"]
        bits = {c: q.recipe.bits[c] for c in DENSE_CLASSES}
        files = q.st.files
    names = {16: "bf16", 8: "q8", 4: "q4", 2: "q2"}
    label = f"experts {'/'.join(formats)} ({expert_bits:.2f} bits/weight), " + ", ".join(f"{c} {names.get(b, b)}" for c, b in bits.items())
    return CheckpointInfo(cfg, "quantized", sum(f.stat().st_size for f in files), StoredPrecision(expert_bits, bits, label))


def _gguf_info(path: Path) -> CheckpointInfo:
    from .checkpoint.gguf_config import config_from_gguf
    from .checkpoint.gguf_file import GGUFModelFiles

    with GGUFModelFiles(path) as files:
        cfg = config_from_gguf(files)
        experts = [t for name, t in files.tensors.items() if re.search(r"\.ffn_(gate|up|down)_exps\.weight$", name)]
        n = sum(math.prod(t.shape) for t in experts)
        expert_bits = 8 * sum(t.nbytes for t in experts) / n if n else 16.0
        kinds = "/".join(sorted({t.type_name for t in experts})) or "none"
        disk = sum(f.path.stat().st_size for f in files.files)
        held = _gguf_held_class_bits(files, cfg)
    label = f"GGUF, experts {kinds} ({expert_bits:.2f} bits/weight)" + "".join(f", {c} {b:.2f}" for c, b in held.items())
    return CheckpointInfo(cfg, "gguf", disk, StoredPrecision(expert_bits, held, label))


# The GGUF types loading keeps as their stored blocks (quant.kquants.GGML_TYPES; a test keeps the two equal).
# Named here so that `inspect` and `plan` on a GGUF need no torch.
GGUF_HELD_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS",
                             "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"})


def _gguf_held_class_bits(files: Any, cfg: ModelConfig) -> dict[str, float]:
    """Bits per weight of each always-used class whose tensors a GGUF load keeps as stored (K-quants,
    Q4_0, Q5_0, IQ4_XS: their blocks, no float copy). Classes with any tensor that loading dequantizes
    to the compute dtype (F16/BF16/F32, Q8_0 without a recipe, other types, tensors joined from parts
    such as MLA's kv_b) are left out: the planner prices those as floats or at the precision it chooses.
    Mirrors checkpoint/gguf.py's GGUFSource name mapping, from the header alone."""
    arch = arch_of(cfg)
    n_layers = cfg.num_hidden_layers
    n_blocks = n_layers + cfg.num_nextn_predict_layers
    bits: dict[str, int] = {}
    count: dict[str, int] = {}
    floats: set[str] = set()
    for hub in arch.schema.hub_names(n_blocks, n_layers, cfg.n_routed_experts):
        cls, layer = arch.schema.classify(hub)
        if cls not in DENSE_CLASSES or (layer is not None and layer >= n_layers):
            continue
        if arch.gguf.joined(hub, files, n_blocks) is not None:
            floats.add(cls)
            continue
        try:
            name, index = arch.gguf.gguf_name(hub, n_blocks)
        except LocalGLMError:
            continue
        t = files.tensors.get(name)
        if t is None:
            continue
        if index is not None or len(t.shape) != 2 or t.type_name not in GGUF_HELD_TYPES:
            floats.add(cls)
            continue
        bits[cls] = bits.get(cls, 0) + 8 * t.nbytes
        count[cls] = count.get(cls, 0) + math.prod(t.shape)
    return {c: bits[c] / count[c] for c in DENSE_CLASSES if c in bits and c not in floats}
