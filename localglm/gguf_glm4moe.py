"""GLM-4.x MoE <-> GGUF (llama.cpp's `glm4moe` architecture): names, metadata, tokenizer, both directions.

Out: `export_gguf` writes what llama.cpp's `convert_hf_to_gguf.py` (class Glm4MoeModel) writes for
the same checkpoint: the same tensor names (through gguf-py's own name map for GLM4_MOE), routed
experts stacked per layer as `[E, out, in]`, the same per-tensor types (norms, biases, routers and
`exp_probs_b.bias` in F32; everything else in the chosen type, F16 where rows do not fit the
quantization blocks), the same `glm4moe.*` hyperparameters and the tokenizer as `_set_vocab_glm`
sets it (gpt2 BPE, pre `glm4`, bos `[gMASK]`, eot `<|user|>`, unk `<|endoftext|>`, eom
`<|observation|>`, eos/pad from tokenizer_config.json, merges, chat template). Tensors are read
through `SafetensorsSource` one at a time and streamed out in row chunks (quant.gguf_writer).

In: `GGUFSource` presents a glm4moe GGUF (single or split) under the Hugging Face hub names the
rest of localglm uses, unstacking expert tensors lazily (one expert's bytes per `get`) and
dequantizing any type gguf-py can (or, `get_quant`, handing a Q8_0 tensor over as our q8 without
dequantizing: the loader does so for Q8_0 experts and for Q8_0 tensors a recipe holds at 8 bits);
`config_from_gguf` and `tokenizer_from_gguf` rebuild the
ModelConfig and the tokenizer (byte-level BPE with GLM's split regex, special tokens, template),
so `localglm.load("model.gguf")` runs the same code as for a safetensors checkpoint; `localglm quantize
FILE.gguf` writes the same as files (`hf_config_from_gguf` -> config.json, `Tokenizer.save`).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from quant.formats import QuantSpec, QuantTensor
from quant.gguf_packed import PACKED_SPECS, q8_0_to_quant
from quant.gguf_reader import PLAIN_TYPES, SUPPORTED_TYPES, GGUFModelFiles, type_name
from quant.gguf_writer import GGUFStreamWriter, fits_type

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, LocalGLMError, TokenizerError
from .tensor_source import SafetensorsSource, TensorInfo, check_expected_shape, missing_tensor_error
from .tiny_tokenizer import GLM_SPLIT_PATTERN
from .tokenizer import Tokenizer

ARCH = "glm4moe"
OUT_TYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# Pre-tokenizer names llama.cpp maps to GLM's split regex (LLAMA_VOCAB_PRE_TYPE_CHATGLM4).
GLM_PRE_NAMES = ("glm4", "chatglm-bpe", "glm5")
KNOWN_ARCHS = {"glm-dsa": "GLM-5.x (MLA + DSA)", "deepseek2": "MLA models such as GLM-4.7-Flash", "glm4": "dense GLM-4"}
CHUNK_ELEMENTS = 1 << 22  # rows per streamed chunk are chosen so a float32 chunk stays near 16 MB

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _name_map(n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.GLM4_MOE, n_blocks)


def gguf_name(hub: str, n_blocks: int) -> tuple[str, int | None]:
    """(GGUF tensor name, expert index or None) of a hub tensor name, as the converter maps it."""
    m = _EXPERT_RE.match(hub)
    base, index = hub, None
    if m:
        base, index = f"model.layers.{m[1]}.mlp.experts.{m[3]}_proj.weight", int(m[2])
    elif hub.endswith("e_score_correction_bias"):
        base = hub.replace("e_score_correction_bias", "e_score_correction.bias")
    if base == "model.embed_tokens.weight":
        return "token_embd.weight", None
    new = _name_map(n_blocks).get_name(base, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise CheckpointError(f"tensor {hub}: no glm4moe GGUF name for it (llama.cpp's converter would refuse it too)")
    return new, index


def hub_name_candidates(n_blocks: int, n_layers: int, n_experts: int) -> Iterator[str]:
    """Every hub tensor name a glm4_moe checkpoint of this shape may hold (a superset)."""
    yield "model.embed_tokens.weight"
    yield "model.norm.weight"
    yield "lm_head.weight"
    for i in range(n_blocks):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight"
        yield f"{p}.post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj"):
            yield f"{p}.self_attn.{proj}.weight"
            yield f"{p}.self_attn.{proj}.bias"
        yield f"{p}.self_attn.o_proj.weight"
        yield f"{p}.self_attn.q_norm.weight"
        yield f"{p}.self_attn.k_norm.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{p}.mlp.{proj}.weight"
            yield f"{p}.mlp.shared_experts.{proj}.weight"
        yield f"{p}.mlp.gate.weight"
        yield f"{p}.mlp.gate.e_score_correction_bias"
        for e in range(n_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield f"{p}.mlp.experts.{e}.{proj}.weight"
        if i >= n_layers:
            for extra in ("eh_proj", "enorm", "hnorm", "shared_head.norm", "shared_head.head", "embed_tokens"):
                yield f"{p}.{extra}.weight"


def tensor_type(name: str, shape: tuple[int, ...], want: QT) -> QT:
    """The GGUF type of tensor `name`: what convert_hf_to_gguf.py picks, plus llama-quantize's output rule."""
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return QT.F32
    if not name.endswith(".weight") or name.endswith("ffn_gate_inp.weight"):
        return QT.F32
    if want == QT.Q4_0 and name == "output.weight":
        want = QT.Q8_0  # llama-quantize keeps the output head at higher precision (Q6_K there; gguf-py cannot write Q6_K)
    if want in (QT.F32, QT.F16, QT.BF16) or fits_type(shape, want):
        return want
    return QT.F16  # the converter's fallback when rows do not split into blocks


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


# (done_bytes, total_bytes, tensor_name) -> None
ExportProgress = Callable[[int, int, str], None]


@dataclass
class _Group:
    """One output tensor and the hub tensors that make it (several for stacked experts)."""

    gguf: str
    parts: list[str]


def _plan_groups(names: list[str], cfg: ModelConfig, n_blocks: int, mtp: bool) -> list[_Group]:
    groups: dict[str, _Group] = {}
    experts: dict[str, dict[int, str]] = {}
    for hub in names:
        m = _LAYER_RE.match(hub)
        if m and int(m[1]) >= cfg.num_hidden_layers and not mtp:
            continue  # an MTP layer, dropped
        if m and int(m[1]) >= n_blocks:
            raise CheckpointError(f"tensor {hub}: layer {m[1]} is beyond the {n_blocks} blocks config.json describes")
        new, index = gguf_name(hub, n_blocks)
        if index is None:
            if new in groups:
                raise CheckpointError(f"tensors {groups[new].parts[0]} and {hub} both map to {new}")
            groups[new] = _Group(new, [hub])
        else:
            experts.setdefault(new, {})[index] = hub
            groups.setdefault(new, _Group(new, []))
    for new, members in experts.items():
        if sorted(members) != list(range(cfg.n_routed_experts)):
            missing = sorted(set(range(cfg.n_routed_experts)) - set(members))
            raise CheckpointError(f"{new}: the checkpoint lacks expert(s) {missing[:8]} of {cfg.n_routed_experts}")
        groups[new].parts = [members[e] for e in range(cfg.n_routed_experts)]

    def order(g: _Group) -> tuple[int, int, str]:
        if g.gguf == "token_embd.weight":
            return (0, 0, "")
        m = re.match(r"^blk\.(\d+)\.", g.gguf)
        return (1, int(m[1]), g.gguf) if m else (2, 0, g.gguf)

    return sorted(groups.values(), key=order)


def _row_chunks(source: SafetensorsSource, names: list[str]) -> Callable[[], Iterator[torch.Tensor]]:
    def produce() -> Iterator[torch.Tensor]:
        for name in names:
            source.release_pages()  # pages earlier tensors touched need not stay in this process's RSS
            t = source.get(name)
            if t.dim() <= 1:
                yield t.reshape(1, -1) if t.dim() == 1 else t.reshape(1, 1)
                continue
            flat = t.reshape(-1, t.shape[-1])
            step = max(1, CHUNK_ELEMENTS // max(1, t.shape[-1]))
            for r in range(0, flat.shape[0], step):
                yield flat[r : r + step]

    return produce


def _gguf_vocab(src: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types in id order, as the converter's get_vocab_base builds them."""
    import tokenizers

    path = src / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path}: missing (a GGUF carries the tokenizer, so export needs it)")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust loader raises plain Exception
        raise TokenizerError(f"{path}: cannot load ({' '.join(str(exc).split())[:200]})") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= vocab_size:
        raise TokenizerError(f"{path}: token id {max(vocab.values())} is not below config.json vocab_size {vocab_size}")
    added = tok.get_added_tokens_decoder()
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            looks_special = (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    pre = _pre_tokenizer_name(path)
    if pre is None:
        raise TokenizerError(
            f"{path}: the pre-tokenizer is not GLM's split regex, so llama.cpp's 'glm4' pre-tokenizer would "
            "split text differently; refusing to write a GGUF that tokenizes wrongly"
        )
    return tokens, [int(t) for t in types]


def _pre_tokenizer_name(tokenizer_json: Path) -> str | None:
    """'glm4' when tokenizer.json splits with GLM's regex (what the converter's hash check finds)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    stack = [data.get("pre_tokenizer") or {}]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        stack.extend(node.get("pretokenizers") or [])
        pattern = node.get("pattern")
        if node.get("type") == "Split" and isinstance(pattern, dict) and pattern.get("Regex") == GLM_SPLIT_PATTERN:
            return "glm4"
    return None


def _add_tokenizer(w: gguf.GGUFWriter, src: Path, vocab_size: int) -> None:
    tokens, types = _gguf_vocab(src, vocab_size)
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("glm4")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True)
    # _set_vocab_glm: the first value set for a kind wins, so these only fill what the configs left unset
    for kind, text in (("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("eom", "<|observation|>")):
        if text not in ids:
            raise TokenizerError(f"{src / 'tokenizer.json'}: GLM special token {text} is missing")
        special.special_token_ids.setdefault(kind, ids[text])
    special.add_to_gguf(w, quiet=True)


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, n_blocks: int, n_mtp: int, ftype: gguf.LlamaFileType) -> None:
    w.add_block_count(n_blocks)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(ftype)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)


def export_gguf(
    src: str | Path,
    out: str | Path,
    out_type: str = "f16",
    *,
    mtp: bool = True,
    split_max_size: int = 0,
    overwrite: bool = False,
    progress: ExportProgress | None = None,
) -> list[Path]:
    """Write the glm4_moe checkpoint at `src` (HF layout) as a llama.cpp glm4moe GGUF; returns the file(s).

    `mtp=False` drops the MTP layer(s) (block_count = layers, no nextn key), like the converter's
    --no-mtp. `split_max_size` > 0 splits into `OUT-0000i-of-0000N.gguf` parts of about that many bytes.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out_type not in OUT_TYPES:
        raise LocalGLMError(f"export-gguf: type {out_type!r} is not one of {', '.join(OUT_TYPES)}")
    if not src.is_dir():
        raise CheckpointError(f"{src}: expected a model directory (config.json + *.safetensors)")
    if out.suffix != ".gguf":
        raise LocalGLMError(f"{out}: the output name must end in .gguf")
    want, ftype = OUT_TYPES[out_type]
    cfg = ModelConfig.from_file(src)
    n_mtp = cfg.num_nextn_predict_layers if mtp else 0
    n_blocks = cfg.num_hidden_layers + n_mtp
    with SafetensorsSource(src, quantization_config=cfg.quantization_config, dequant_dtype=torch.float32) as source:
        groups = _plan_groups(source.names(), cfg, n_blocks, mtp)
        writer = GGUFStreamWriter(out, ARCH, split_max_size=split_max_size)
        for g in groups:
            first = source.info(g.parts[0])
            shape = (len(g.parts), *first.shape) if len(g.parts) > 1 or _EXPERT_RE.match(g.parts[0]) else first.shape
            for part in g.parts[1:]:
                if source.info(part).shape != first.shape:
                    raise CheckpointError(f"tensor {part} has shape {source.info(part).shape}, {g.parts[0]} has {first.shape}")
            writer.add_tensor(g.gguf, tuple(shape), tensor_type(g.gguf, tuple(shape), want), _row_chunks(source, g.parts))
        finals = writer.final_paths()
        existing = [p for p in finals if p.exists()]
        if existing and not overwrite:
            raise LocalGLMError(f"{existing[0]}: already exists (pass --overwrite to replace it)")
        w = writer.meta
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(src.name)
        total, shared, expert, n_exp = writer.parameter_counts()
        if total > 0:
            w.add_size_label(gguf.size_label(total, shared, expert, n_exp))
        _add_hparams(w, cfg, n_blocks, n_mtp, ftype)
        _add_tokenizer(w, src, cfg.vocab_size)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        out.parent.mkdir(parents=True, exist_ok=True)
        return writer.write(progress)


# --------------------------------------------------------------------------------------------
# Import: config, tokenizer, tensors
# --------------------------------------------------------------------------------------------


def check_architecture(files: GGUFModelFiles) -> None:
    arch = files.metadata.get("general.architecture")
    if arch != ARCH:
        what = KNOWN_ARCHS.get(str(arch))
        extra = f" ({what})" if what else ""
        raise CheckpointError(
            f"{files.where}: GGUF architecture {arch!r}{extra} is not supported; localglm runs {ARCH!r} "
            "(GLM-4.5, 4.5-Air, 4.6, 4.7)"
        )


def _uniform(value: Any, key: str, where: str) -> Any:
    """A per-layer array key must hold one value for every layer (we do not run per-layer shapes)."""
    if isinstance(value, list):
        if not value or any(v != value[0] for v in value):
            raise ConfigError(f"{where}: GGUF metadata {key} varies per layer ({value[:4]}...), which is not supported")
        return value[0]
    return value


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def config_from_gguf(files: GGUFModelFiles) -> ModelConfig:
    """ModelConfig from glm4moe GGUF metadata (llama.cpp's defaults where a key is optional)."""
    return ModelConfig.from_dict(hf_config_from_gguf(files), source=f"{files.where} (GGUF metadata)")


def hf_config_from_gguf(files: GGUFModelFiles) -> dict[str, Any]:
    """The Hugging Face config.json (as a dict) that glm4moe GGUF metadata describes; `config_from_gguf` parses it."""
    check_architecture(files)
    meta, where = files.metadata, str(files.where)
    p = f"{ARCH}."

    def req(key: str) -> Any:
        if p + key not in meta:
            raise ConfigError(f"{where}: GGUF metadata {p + key} is missing")
        return _uniform(meta[p + key], p + key, where)

    def opt(key: str, default: Any) -> Any:
        return _uniform(meta.get(p + key, default), p + key, where)

    if "token_embd.weight" not in files.tensors:
        raise CheckpointError(f"{where}: tensor token_embd.weight is missing")
    n_blocks = req("block_count")
    n_mtp = opt("nextn_predict_layers", 0)
    hidden = req("embedding_length")
    heads = req("attention.head_count")
    head_dim = opt("attention.key_length", hidden // heads if heads else 0)
    if opt("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{where}: GGUF metadata {p}attention.value_length differs from key_length")
    rot = opt("rope.dimension_count", head_dim)
    scaling = opt("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConfigError(f"{where}: GGUF metadata {p}rope.scaling.type {scaling!r} is not supported (only plain RoPE)")
    gating = opt("expert_gating_func", int(gguf.ExpertGatingFuncType.SIGMOID))
    if gating not in (0, int(gguf.ExpertGatingFuncType.SIGMOID)):
        raise ConfigError(f"{where}: GGUF metadata {p}expert_gating_func {gating} is not sigmoid (2), which GLM uses")
    moe_inter = req("expert_feed_forward_length")
    embd_type = files.tensors["token_embd.weight"].ggml_type
    attn = files.tensors.get("blk.0.attn_q.weight")
    dtype_of = {QT.F32: "float32", QT.F16: "float16", QT.BF16: "bfloat16"}
    ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": files.tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden,
        "intermediate_size": opt("feed_forward_length", moe_inter),
        "num_hidden_layers": n_blocks - n_mtp,
        "num_attention_heads": heads,
        "num_key_value_heads": opt("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "moe_intermediate_size": moe_inter,
        "n_routed_experts": req("expert_count"),
        "num_experts_per_tok": req("expert_used_count"),
        "n_shared_experts": opt("expert_shared_count", 0),
        "first_k_dense_replace": opt("leading_dense_block_count", 0),
        "routed_scaling_factor": _f32(opt("expert_weights_scale", 1.0)) or 1.0,
        "n_group": opt("expert_group_count", 1) or 1,
        "topk_group": opt("expert_group_used_count", 1) or 1,
        "norm_topk_prob": bool(opt("expert_weights_norm", False)),
        "rms_norm_eps": _f32(req("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(opt("rope.freq_base", 10000.0)),
        "partial_rotary_factor": rot / head_dim if head_dim else 0.0,
        "max_position_embeddings": req("context_length"),
        "attention_bias": "blk.0.attn_q.bias" in files.tensors,
        "use_qk_norm": "blk.0.attn_q_norm.weight" in files.tensors,
        "num_nextn_predict_layers": n_mtp,
        "tie_word_embeddings": "output.weight" not in files.tensors,
        "eos_token_id": list(dict.fromkeys(i for i in ids if isinstance(i, int))),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype_of.get(attn.ggml_type if attn else embd_type, "bfloat16"),
    }


def tokenizer_from_gguf(files: GGUFModelFiles) -> Tokenizer:
    """The checkpoint's tokenizer rebuilt from GGUF tokens/merges: byte-level BPE, GLM split, specials, template."""
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    meta, where = files.metadata, files.where
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"{where}: tokenizer.ggml.model {model!r} is not supported (GLM GGUFs use 'gpt2' BPE)")
    pre = meta.get("tokenizer.ggml.pre", "glm4")
    if pre not in GLM_PRE_NAMES:
        raise TokenizerError(f"{where}: tokenizer.ggml.pre {pre!r} is not GLM's ({', '.join(GLM_PRE_NAMES)})")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{where}: GGUF metadata tokenizer.ggml.tokens is missing")
    if not isinstance(merges, list):
        raise TokenizerError(f"{where}: GGUF metadata tokenizer.ggml.merges is missing")
    types = meta.get("tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)
        if cut < 0:
            raise TokenizerError(f"{where}: tokenizer.ggml.merges entry {m!r} is not 'A B'")
        pairs.append((m[:cut], m[cut + 1 :]))
    # llama.cpp sets ignore_merges for the glm4 pre-tokenizer: a piece that is itself a token is taken whole.
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre != "chatglm-bpe", fuse_unk=False, byte_fallback=False)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    control = [tokens[i] for i, ty in enumerate(types) if ty == gguf.TokenType.CONTROL]
    user = [tokens[i] for i, ty in enumerate(types) if ty == gguf.TokenType.USER_DEFINED]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in user])
    config: dict[str, Any] = {}
    # tokenizer_config.json's named tokens, which chat templates see (GLM's names only eos and pad)
    for kind, key in (("eos", "tokenizer.ggml.eos_token_id"), ("pad", "tokenizer.ggml.padding_token_id")):
        tid = meta.get(key)
        if isinstance(tid, int) and 0 <= tid < len(tokens):
            config[f"{kind}_token"] = tokens[tid]
    templates: dict[str, str] = {}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        templates["default"] = meta["tokenizer.chat_template"]
    for name in meta.get("tokenizer.chat_templates") or []:
        text = meta.get(f"tokenizer.chat_template.{name}")
        if isinstance(text, str):
            templates[name] = text
    return Tokenizer(backend, config=config, chat_templates=templates, source=str(where))


@dataclass(frozen=True)
class GGUFTensorInfo(TensorInfo):
    """TensorInfo of a GGUF-backed tensor; `gguf_name`/`index` locate it (index: expert slice of a stacked tensor)."""

    ggml_type: str = "F32"
    gguf_name: str = ""
    index: int | None = None


class GGUFSource:
    """A glm4moe GGUF (single file or split set) as a TensorSource under hub tensor names.

    Stacked expert tensors `blk.N.ffn_{gate,up,down}_exps` appear as
    `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`; each `get` reads and dequantizes one
    expert's slice. F32/F16/BF16 tensors come back as read-only views of the mapped file when no
    dtype change is asked (clone before writing); quantized ones are dequantized to `dequant_dtype`
    (or the dtype asked). `raw(name)` gives the stored bytes and `info(name).ggml_type` their type;
    `get_quant` takes a Q8_0 tensor as a q8 QuantTensor without dequantizing (`packed_spec` says which).
    """

    def __init__(
        self, path: str | Path | GGUFModelFiles, *, dequant_dtype: torch.dtype = torch.bfloat16
    ) -> None:
        self.files = path if isinstance(path, GGUFModelFiles) else GGUFModelFiles(path)
        check_architecture(self.files)
        self.dequant_dtype = dequant_dtype
        meta = self.files.metadata
        n_blocks = meta.get(f"{ARCH}.block_count")
        if not isinstance(n_blocks, int) or n_blocks <= 0:
            raise CheckpointError(f"{self.files.where}: GGUF metadata {ARCH}.block_count is missing or invalid")
        n_layers = n_blocks - int(meta.get(f"{ARCH}.nextn_predict_layers", 0) or 0)
        n_experts = int(_uniform(meta.get(f"{ARCH}.expert_count", 0), f"{ARCH}.expert_count", str(self.files.where)) or 0)
        self._infos: dict[str, GGUFTensorInfo] = {}
        for hub in hub_name_candidates(n_blocks, n_layers, n_experts):
            new, index = gguf_name(hub, n_blocks)
            t = self.files.tensors.get(new)
            if t is None:
                continue
            if t.ggml_type not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{t.file}: tensor {new} is stored as {t.type_name}, which localglm cannot read "
                    f"(supported: {', '.join(sorted(type_name(x) for x in SUPPORTED_TYPES))})"
                )
            shape = t.shape
            begin, nbytes = t.offset, t.nbytes
            if index is not None:
                if len(shape) != 3 or shape[0] != n_experts:
                    raise CheckpointError(f"{t.file}: tensor {new} has shape {list(shape)}, expected [{n_experts}, out, in]")
                shape = shape[1:]
                nbytes //= n_experts
                begin += index * nbytes
            plain = PLAIN_TYPES.get(t.ggml_type)
            self._infos[hub] = GGUFTensorInfo(
                name=hub,
                shape=tuple(shape),
                dtype=plain or dequant_dtype,
                file=t.file,
                offsets=(begin, begin + nbytes),
                stored_dtype=plain or torch.uint8,
                ggml_type=t.type_name,
                gguf_name=new,
                index=index,
            )
        self._infos = dict(sorted(self._infos.items()))

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> GGUFTensorInfo:
        info = self._infos.get(name)
        if info is None:
            raise missing_tensor_error(name, self._infos, self.files.where)
        return info

    def get(
        self, name: str, dtype: torch.dtype | None = None, expected_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        info = self.info(name)
        check_expected_shape(info, expected_shape)
        return self.files.tensor(info.gguf_name, dtype=dtype or info.dtype, index=info.index)

    def raw(self, name: str) -> torch.Tensor:
        """The stored bytes of `name` (one expert's slice for experts), as a read-only uint8 tensor."""
        info = self.info(name)
        arr = self.files.raw(info.gguf_name, info.index)
        with warnings.catch_warnings():
            # a read-only view of the mapped file, by design (see the class docstring)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            return torch.from_numpy(arr) if arr.size else torch.empty(0, dtype=torch.uint8)

    def packed_spec(self, name: str) -> QuantSpec | None:
        """The QuantSpec `name` is stored in already (a 2-D Q8_0 is q8), or None where it must be dequantized."""
        info = self.info(name)
        return PACKED_SPECS.get(info.ggml_type) if len(info.shape) == 2 else None

    def get_quant(self, name: str, dtype: torch.dtype | None = None, expected_shape: tuple[int, ...] | None = None) -> QuantTensor:
        """A Q8_0 tensor as a q8 QuantTensor, its blocks copied as they are (exact: quant.gguf_packed)."""
        info = self.info(name)
        check_expected_shape(info, expected_shape)
        if self.packed_spec(name) is None:
            raise CheckpointError(f"{info.file}: tensor {info.gguf_name} is {info.ggml_type} {list(info.shape)}; only 2-D Q8_0 is taken packed")
        return q8_0_to_quant(self.raw(name), (info.shape[0], info.shape[1]), dtype or info.dtype)

    def release_pages(self) -> None:
        """Drop this process's hold on mapped pages read so far (see SafetensorsSource.release_pages)."""
        self.files.release_pages()

    def close(self) -> None:
        self.files.close()

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFSource({str(self.files.where)!r}, {len(self._infos)} tensors, {len(self.files.files)} files)"


def is_gguf_path(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


class GGUFCheckpoint:
    """Everything `localglm.load` needs from one GGUF (single or split): config, tensors, tokenizer."""

    def __init__(self, path: str | Path) -> None:
        self.files = GGUFModelFiles(path)
        try:
            self.config = config_from_gguf(self.files)
        except BaseException:
            self.files.close()
            raise

    def source(self) -> GGUFSource:
        return GGUFSource(self.files)

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_gguf(self.files)
