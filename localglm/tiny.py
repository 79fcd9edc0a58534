"""`localglm make-tiny`: write a random GLM checkpoint of any registered architecture in the real hub layout.

No weights can be downloaded here, so tests and benchmarks build their own checkpoints: sharded
safetensors with an index, config.json in GLM's own spelling, a small BPE tokenizer with GLM's
special tokens, and the GLM chat template. Every shape knob is a field of the architecture's spec
(a `TinySpecBase` subclass in localglm/models/<arch>/tiny.py); what every GLM shares (the MoE
layout, norms, embeddings, the MTP block's extra tensors, the FP8 layout) is written here once.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .checkpoint.writing import publish_dir, refuse_odd_target, writing
from .errors import LocalGLMError
from .chat.tiny_tokenizer import BYTE_ALPHABET, GLM_SPECIAL_TOKENS, build_tiny_tokenizer

TINY_SPEC_FILE = "localglm_tiny_spec.json"  # the spec a checkpoint was made from: it marks make-tiny's outputs

if TYPE_CHECKING:  # torch is imported where weights are made: the specs (make-tiny's flags) need none
    import torch


@dataclass
class TinySpecBase:
    """Shape knobs every GLM MoE architecture has (defaults: a few-MB test model)."""

    model_type: ClassVar[str] = ""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 3
    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    rope_theta: float = 1_000_000.0
    rope_style: str = "legacy"  # "legacy" (top-level keys, like GLM's hub configs) or "parameters"
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32 | fp8 (e4m3 block-scaled, GLM-4.5-FP8 layout)
    chat_style: str = "glm45"  # glm45 | glm47
    seed: int = 0
    max_shard_bytes: int | None = None  # None: about three shards
    init_scale: float = 1.0  # weight std is init_scale / sqrt(fan_in)

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32", "fp8"):
            raise LocalGLMError(f"make-tiny: dtype {self.dtype!r} is not one of bfloat16, float16, float32, fp8")
        if self.rope_style not in ("legacy", "parameters"):
            raise LocalGLMError(f"make-tiny: rope_style {self.rope_style!r} is not 'legacy' or 'parameters'")
        if self.chat_style not in ("glm45", "glm47"):
            raise LocalGLMError(f"make-tiny: chat_style {self.chat_style!r} is not 'glm45' or 'glm47'")
        if not 0 <= self.seed < 2**64:
            raise LocalGLMError(f"make-tiny: seed {self.seed} must be from 0 to {2**64 - 1}")
        if self.max_shard_bytes is not None and self.max_shard_bytes <= 0:
            raise LocalGLMError(f"make-tiny: max_shard_bytes {self.max_shard_bytes} must be positive")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise LocalGLMError(f"make-tiny: init_scale {self.init_scale} must be a finite positive number")
        minimum = BYTE_ALPHABET + len(GLM_SPECIAL_TOKENS) + 1
        if self.vocab_size < minimum:
            raise LocalGLMError(f"make-tiny: vocab_size {self.vocab_size} must be at least {minimum} (256 bytes + GLM's special tokens + 1)")

    def special_ids(self) -> dict[str, int]:
        """Where the tiny tokenizer puts GLM's special tokens: the top of the vocabulary, in order."""
        first = self.vocab_size - len(GLM_SPECIAL_TOKENS)
        return {t: first + i for i, t in enumerate(GLM_SPECIAL_TOKENS)}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def rope_keys(self) -> dict[str, float]:
        """The RoPE fields of config.json (partial_rotary_factor where the spec has one)."""
        return {"rope_theta": self.rope_theta}


def base_config_json(spec: TinySpecBase, special: dict[str, int], hf_architecture: str) -> dict[str, Any]:
    """config.json fields every GLM MoE architecture writes, in GLM's own spelling."""
    eos = [special["<|endoftext|>"], special["<|user|>"], special["<|observation|>"]]
    cfg: dict[str, Any] = {
        "architectures": [hf_architecture],
        "model_type": spec.model_type,
        "attention_dropout": 0.0,
        "pad_token_id": special["<|endoftext|>"],
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "moe_intermediate_size": spec.moe_intermediate_size,
        "n_group": spec.n_group,
        "n_routed_experts": spec.n_routed_experts,
        "n_shared_experts": spec.n_shared_experts,
        "norm_topk_prob": spec.norm_topk_prob,
        "num_experts_per_tok": spec.num_experts_per_tok,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_nextn_predict_layers": spec.num_nextn_predict_layers,
        "first_k_dense_replace": spec.first_k_dense_replace,
        "rms_norm_eps": spec.rms_norm_eps,
        "routed_scaling_factor": spec.routed_scaling_factor,
        "tie_word_embeddings": False,
        "topk_group": spec.topk_group,
        "torch_dtype": "bfloat16" if spec.dtype == "fp8" else spec.dtype,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    rope = spec.rope_keys()
    if spec.rope_style == "legacy":
        cfg.update(rope)
    else:
        cfg["rope_parameters"] = {"rope_type": "default", **rope}
    if spec.dtype == "fp8":
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    return cfg


class RandomWeights:
    """Seeded random weights of the spec's storage dtype (fan-in scaled, so activations stay O(1))."""

    def __init__(self, spec: TinySpecBase) -> None:
        import torch

        self.g = torch.Generator().manual_seed(spec.seed)
        self.spec = spec
        self.store = torch.float32 if spec.dtype in ("float32", "fp8") else getattr(torch, spec.dtype)

    def lin(self, out: int, inp: int) -> torch.Tensor:
        import torch

        return (torch.randn(out, inp, generator=self.g) * (self.spec.init_scale / math.sqrt(inp))).to(self.store)

    def vec(self, n: int, base: float = 0.0, std: float = 0.1) -> torch.Tensor:
        import torch

        return (base + std * torch.randn(n, generator=self.g)).to(self.store)

    def mlp(self, prefix: str, inter: int) -> Iterator[tuple[str, torch.Tensor]]:
        h = self.spec.hidden_size
        yield f"{prefix}.gate_proj.weight", self.lin(inter, h)
        yield f"{prefix}.up_proj.weight", self.lin(inter, h)
        yield f"{prefix}.down_proj.weight", self.lin(h, inter)


# attention(r, layer prefix "model.layers.i") -> that layer's attention tensors
AttentionTensors = Callable[[RandomWeights, str], Iterator[tuple[str, "torch.Tensor"]]]


def moe_tensors(spec: TinySpecBase, attention: AttentionTensors) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights in hub names, one layer at a time (a big spec never sits whole in RAM):
    the architecture gives each layer's attention tensors, the rest is the shared MoE decoder."""
    import torch

    r = RandomWeights(spec)
    s, h = spec, spec.hidden_size

    def block(i: int) -> Iterator[tuple[str, torch.Tensor]]:
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", r.vec(h, 1.0)
        yield f"{p}.post_attention_layernorm.weight", r.vec(h, 1.0)
        yield from attention(r, p)
        if i < s.first_k_dense_replace:
            yield from r.mlp(f"{p}.mlp", s.intermediate_size)
            return
        yield f"{p}.mlp.gate.weight", r.lin(s.n_routed_experts, h)
        yield f"{p}.mlp.gate.e_score_correction_bias", (0.05 * torch.randn(s.n_routed_experts, generator=r.g))
        for e in range(s.n_routed_experts):
            yield from r.mlp(f"{p}.mlp.experts.{e}", s.moe_intermediate_size)
        if s.n_shared_experts:
            yield from r.mlp(f"{p}.mlp.shared_experts", s.moe_intermediate_size * s.n_shared_experts)

    yield "model.embed_tokens.weight", (torch.randn(s.vocab_size, h, generator=r.g)).to(r.store)
    for i in range(s.num_hidden_layers):
        yield from block(i)
    for j in range(s.num_nextn_predict_layers):  # MTP layers, in GLM's layout; the runner ignores them
        i = s.num_hidden_layers + j
        p = f"model.layers.{i}"
        yield f"{p}.enorm.weight", r.vec(h, 1.0)
        yield f"{p}.hnorm.weight", r.vec(h, 1.0)
        yield f"{p}.eh_proj.weight", r.lin(h, 2 * h)
        yield f"{p}.shared_head.norm.weight", r.vec(h, 1.0)
        yield from block(i)
    yield "model.norm.weight", r.vec(h, 1.0)
    yield "lm_head.weight", r.lin(s.vocab_size, h)


def moe_param_estimate(spec: TinySpecBase, attention_per_layer: int) -> int:
    """About how many parameters the spec's checkpoint holds (for the shard size)."""
    s, h = spec, spec.hidden_size
    dense = 3 * h * s.intermediate_size
    moe = 3 * h * s.moe_intermediate_size * (s.n_routed_experts + s.n_shared_experts) + s.n_routed_experts * h
    layers = s.num_hidden_layers + s.num_nextn_predict_layers
    return 2 * s.vocab_size * h + layers * attention_per_layer + s.first_k_dense_replace * dense + (layers - s.first_k_dense_replace) * moe


def fp8_layout(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """GLM-4.5-FP8 layout: 2-D projection weights in e4m3 with `weight_scale_inv` block scales."""
    import torch

    from .checkpoint.safetensors import quantize_fp8_blockwise

    for name, t in tensors:
        fp8_able = t.dim() == 2 and name.endswith("_proj.weight") and "eh_proj" not in name and "weights_proj" not in name
        if fp8_able:
            w8, scale = quantize_fp8_blockwise(t.float())
            yield name, w8
            yield name[: -len("weight")] + "weight_scale_inv", scale
        elif t.dim() == 1 and "e_score_correction_bias" in name:
            yield name, t.float()
        else:
            yield name, t.to(torch.bfloat16)


def make_tiny(out: str | Path, spec: TinySpecBase | None = None, *, overwrite: bool = False) -> Path:
    """Write a random checkpoint of the spec's architecture (default: glm4_moe's default spec) to
    `out` (built in a temporary directory, then renamed). The config it would write is parsed first, so a
    spec no model can have (a negative width, more experts per token than experts) is refused before
    anything is written, and an existing `out` is kept."""
    from .config import ModelConfig
    from .models import ARCHITECTURES, arch_for_model_type

    arch = arch_for_model_type(spec.model_type, "make-tiny") if spec is not None else ARCHITECTURES["glm4_moe"]
    spec = spec or arch.tiny.spec()
    ModelConfig.from_dict(arch.tiny.config_json(spec, spec.special_ids()), "make-tiny")
    _check_fits_in_memory(arch, spec)
    out = Path(out).expanduser()
    refuse_odd_target(out)  # before the work (publish_dir checks again)
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise LocalGLMError(f"{out}: already exists (pass --overwrite to replace it)")
        _check_replaceable(out)
    with writing(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        with writing(out, tmp):
            _write_tiny(arch, spec, tmp)
            publish_dir(tmp, out)
    return out


# What make-tiny writes besides its weights: --overwrite replaces a directory holding only these (an earlier make-tiny output).
_TINY_FILES = {"config.json", "generation_config.json", TINY_SPEC_FILE, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory that is not an earlier make-tiny output (`make-tiny DIR --overwrite` deleted
    whatever DIR held, a user's notes and subdirectories included; found by a hostile-input sweep)."""
    from .checkpoint.safetensors import INDEX_FILE_NAME, SHARD_NAME_RE, SINGLE_FILE_NAME  # imports torch: only here

    if not (out / TINY_SPEC_FILE).is_file():
        raise LocalGLMError(f"{out}: exists and is not a make-tiny checkpoint; refusing to replace it (choose another path)")
    ours = _TINY_FILES | {INDEX_FILE_NAME, SINGLE_FILE_NAME}
    foreign = sorted(p.name for p in out.iterdir() if p.is_dir() or not (p.name in ours or SHARD_NAME_RE.match(p.name)))
    if foreign:
        raise LocalGLMError(f"{out} also holds {', '.join(foreign[:3])}, which make-tiny did not write; refusing to replace it")


def _check_fits_in_memory(arch: Any, spec: TinySpecBase) -> None:
    """Refuse a spec whose weights would not fit in this machine's available memory, before anything is
    allocated: a make-tiny --hidden-size 99999999 died in torch's allocator with a traceback, and 100,000
    layers spent minutes before safetensors refused the header."""
    import psutil

    nbytes = arch.tiny.estimate_params(spec) * (4 if spec.dtype == "float32" else 2)
    free = psutil.virtual_memory().available
    if nbytes > free // 2:
        raise LocalGLMError(
            f"make-tiny: that checkpoint would hold {nbytes / 2**30:.1f} GiB of weights, more than half of this machine's "
            f"available memory ({free / 2**30:.1f} GiB); make-tiny is for small test checkpoints"
        )


def _write_tiny(arch: Any, spec: TinySpecBase, tmp: Path) -> None:
    """Every file of the tiny checkpoint, into the temporary directory `tmp`."""
    from .checkpoint.safetensors import save_safetensors_sharded

    special = build_tiny_tokenizer(tmp, vocab_size=spec.vocab_size, style=spec.chat_style)
    cfg = arch.tiny.config_json(spec, special)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"_from_model_config": True, "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"], "temperature": 0.6, "top_p": 0.95, "do_sample": True}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (tmp / TINY_SPEC_FILE).write_text(json.dumps({"model_type": spec.model_type, **asdict(spec)}, indent=2) + "\n")
    tensors = arch.tiny.tensors(spec)
    if spec.dtype == "fp8":
        tensors = fp8_layout(tensors)
    bytes_per = 4 if spec.dtype == "float32" else 2
    shard = spec.max_shard_bytes or max(1, arch.tiny.estimate_params(spec) * bytes_per // 3 + 1)
    save_safetensors_sharded(tensors, tmp, max_shard_bytes=shard, metadata={"format": "pt"})
