"""The GGUF side of the GLM MoE decoder, shared by every architecture of the family: tensor names
through gguf-py's own name map for the architecture, and the MoE metadata keys llama.cpp's
converter writes (experts, gating, scale, leading dense blocks, MTP), both directions.

An architecture's GGUF schema subclasses `MoeGGUFSchema` with its llama.cpp architecture, its
attention keys (`add_attention_hparams`, `attention_config`) and the dtype probe tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
# The MTP block's own tensors -> gguf-py's NEXTN tensor kinds (gguf 0.19 maps them for glm4moe only)
_NEXTN_RE = re.compile(r"^model\.layers\.(\d+)\.(eh_proj|enorm|hnorm|embed_tokens|shared_head\.norm|shared_head\.head)\.weight$")
_NEXTN = {
    "eh_proj": gguf.MODEL_TENSOR.NEXTN_EH_PROJ,
    "enorm": gguf.MODEL_TENSOR.NEXTN_ENORM,
    "hnorm": gguf.MODEL_TENSOR.NEXTN_HNORM,
    "embed_tokens": gguf.MODEL_TENSOR.NEXTN_EMBED_TOKENS,
    "shared_head.norm": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM,
    "shared_head.head": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_HEAD,
}


@dataclass(frozen=True)
class SplitPart:
    """One GGUF tensor that the converter makes from part of a hub tensor (export)."""

    gguf: str
    shape: tuple[int, ...]  # numpy order
    take: Callable[[Any], Any]  # the hub tensor -> this part (a torch tensor, C order)


@dataclass(frozen=True)
class JoinedTensor:
    """A hub tensor that a GGUF holds as several tensors (import): their names, the hub shape, and
    how to put them back together (torch tensors in -> the hub tensor out)."""

    parts: tuple[str, ...]
    shape: tuple[int, ...]
    join: Callable[[list[Any]], Any]


def metadata_float(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


BLOCK_OF = re.compile(r"blk\.(\d+)\.")  # a block's tensors: blk.N.*


class GGUFMetadata:
    """Typed access to `<arch>.*` metadata keys, with errors naming the file and the key."""

    def __init__(self, files: Any, arch: str) -> None:
        self.meta, self.where, self.prefix = files.metadata, str(files.where), f"{arch}."

    def _uniform(self, value: Any, key: str) -> Any:
        """A per-layer array key must hold one value for every layer (we do not run per-layer shapes)."""
        if isinstance(value, list):
            if not value or any(v != value[0] for v in value):
                raise ConfigError(f"{self.where}: GGUF metadata {key} varies per layer ({value[:4]}...), which is not supported")
            return value[0]
        return value

    def req(self, key: str) -> Any:
        k = self.prefix + key
        if k not in self.meta:
            raise ConfigError(f"{self.where}: GGUF metadata {k} is missing")
        return self._uniform(self.meta[k], k)

    def opt(self, key: str, default: Any) -> Any:
        return self._uniform(self.meta.get(self.prefix + key, default), self.prefix + key)

    def block_count(self, files: Any) -> int:
        """`block_count`, checked against the blocks the tensors hold (`blk.N.*`) before anything is sized by it:
        10**6 in a 3-layer file hung `inspect` building gguf's name map for a million blocks, and 5 reported
        4 layers without a word (a hostile-input sweep). The MTP blocks (`nextn_predict_layers`) may be absent
        altogether."""
        key = self.prefix + "block_count"
        n = self.req("block_count")
        mtp = self.opt("nextn_predict_layers", 0)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ConfigError(f"{self.where}: GGUF metadata {key} {n!r} is not a positive integer")
        if not isinstance(mtp, int) or isinstance(mtp, bool) or not 0 <= mtp < n:
            raise ConfigError(f"{self.where}: GGUF metadata {self.prefix}nextn_predict_layers {mtp!r} does not fit {key} {n}")
        held = 1 + max((int(m.group(1)) for m in map(BLOCK_OF.match, files.tensors) if m), default=-1)
        mtp_dropped = held == n - mtp and not any(".nextn." in name for name in files.tensors)
        if held != n and not mtp_dropped:
            raise ConfigError(f"{self.where}: GGUF metadata {key} is {n}, but the file's tensors hold {held} blocks")
        return n


def _check_sizes_against_tensors(meta: GGUFMetadata, files: Any, hidden: Any, n_experts: Any, moe_inter: Any) -> None:
    """The widths the header states, checked against the tensors that hold them, so that `inspect` and `plan`
    (which read the header alone) do not describe another model: embedding_length 128 in a 256-wide file, or
    expert_count 64 in a 4-expert one, were reported as given (loading refused them later)."""
    embd = files.tensors["token_embd.weight"].shape
    if len(embd) == 2 and embd[1] != hidden:
        raise ConfigError(f"{meta.where}: GGUF metadata {meta.prefix}embedding_length is {hidden!r}, but token_embd.weight is {list(embd)}")
    stacked = next((t for name, t in files.tensors.items() if name.endswith(".ffn_gate_exps.weight")), None)
    if stacked is not None and len(stacked.shape) == 3 and (stacked.shape[0], stacked.shape[1]) != (n_experts, moe_inter):
        raise ConfigError(
            f"{meta.where}: GGUF metadata {meta.prefix}expert_count {n_experts!r} / expert_feed_forward_length {moe_inter!r} "
            f"do not match {stacked.name} {list(stacked.shape)}"
        )


class MoeGGUFSchema:
    """GGUF names and keys of a GLM MoE model; subclasses set the class attributes and the attention parts."""

    arch: str = ""  # general.architecture (llama.cpp's name)
    model_arch: gguf.MODEL_ARCH  # gguf-py's enum, for its tensor name map
    hf_architecture: str = ""
    model_type: str = ""
    dtype_probe: str = ""  # a GGUF tensor whose stored type tells the checkpoint's float dtype

    @staticmethod
    @lru_cache(maxsize=16)
    def _name_map(model_arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(model_arch, n_blocks)

    def gguf_name(self, hub: str, n_blocks: int) -> tuple[str, int | None]:
        """(GGUF tensor name, expert index or None) of a hub tensor name, as the converter maps it."""
        m = _EXPERT_RE.match(hub)
        base, index = hub, None
        if m:
            base, index = f"model.layers.{m[1]}.mlp.experts.{m[3]}_proj.weight", int(m[2])
        elif hub.endswith("e_score_correction_bias"):
            base = hub.replace("e_score_correction_bias", "e_score_correction.bias")
        if base == "model.embed_tokens.weight":
            return "token_embd.weight", None
        nextn = _NEXTN_RE.match(hub)
        if nextn:
            return gguf.TENSOR_NAMES[_NEXTN[nextn[2]]].format(bid=int(nextn[1])) + ".weight", None
        new = self._name_map(self.model_arch, n_blocks).get_name(base, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise CheckpointError(f"tensor {hub}: no {self.arch} GGUF name for it (llama.cpp's converter would refuse it too)")
        return new, index

    def split(self, hub: str, cfg: Any, n_blocks: int) -> list[SplitPart] | None:
        """The GGUF tensors a hub tensor becomes when the converter transforms it (None: one, as is)."""
        return None

    def joined(self, hub: str, files: Any, n_blocks: int) -> JoinedTensor | None:
        """How a hub tensor is rebuilt from several GGUF tensors (None: it maps to one)."""
        return None

    # ---- export ---------------------------------------------------------------------------------
    def add_hparams(self, w: gguf.GGUFWriter, cfg: ModelConfig, n_blocks: int, n_mtp: int, ftype: gguf.LlamaFileType) -> None:
        """The metadata convert_hf_to_gguf.py writes for this architecture."""
        w.add_block_count(n_blocks)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
        w.add_file_type(ftype)
        self.add_attention_hparams(w, cfg)
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        if n_mtp:
            w.add_nextn_predict_layers(n_mtp)

    def add_attention_hparams(self, w: gguf.GGUFWriter, cfg: Any) -> None:
        raise NotImplementedError

    # ---- import ---------------------------------------------------------------------------------
    def hf_config(self, files: Any) -> dict[str, Any]:
        """The Hugging Face config.json (as a dict) that the GGUF metadata describes (llama.cpp's
        defaults where a key is optional)."""
        meta = GGUFMetadata(files, self.arch)
        where = meta.where
        if "token_embd.weight" not in files.tensors:
            raise CheckpointError(f"{where}: tensor token_embd.weight is missing")
        n_blocks = meta.block_count(files)
        n_mtp = meta.opt("nextn_predict_layers", 0)
        if n_mtp and not any(name.startswith("blk.0.") for name in files.tensors):
            raise ConfigError(
                f"{where}: holds only the MTP draft head (the converter's --mtp leaves out blocks 0-{n_blocks - n_mtp - 1}); "
                "localglm drafts with the block inside the model's own GGUF: load that (converted without --no-mtp)"
            )
        scaling = meta.opt("rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise ConfigError(f"{where}: GGUF metadata {self.arch}.rope.scaling.type {scaling!r} is not supported (only plain RoPE)")
        gating = meta.opt("expert_gating_func", int(gguf.ExpertGatingFuncType.SIGMOID))
        if gating not in (0, int(gguf.ExpertGatingFuncType.SIGMOID)):
            raise ConfigError(f"{where}: GGUF metadata {self.arch}.expert_gating_func {gating} is not sigmoid (2), which GLM uses")
        moe_inter = meta.req("expert_feed_forward_length")
        _check_sizes_against_tensors(meta, files, meta.req("embedding_length"), meta.req("expert_count"), moe_inter)
        probe = files.tensors.get(self.dtype_probe) or files.tensors["token_embd.weight"]
        dtype_of = {QT.F32: "float32", QT.F16: "float16", QT.BF16: "bfloat16"}
        ids = [meta.meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": files.tensors["token_embd.weight"].shape[0],
            "hidden_size": meta.req("embedding_length"),
            "intermediate_size": meta.opt("feed_forward_length", moe_inter),
            "num_hidden_layers": n_blocks - n_mtp,
            "moe_intermediate_size": moe_inter,
            "n_routed_experts": meta.req("expert_count"),
            "num_experts_per_tok": meta.req("expert_used_count"),
            "n_shared_experts": meta.opt("expert_shared_count", 0),
            "first_k_dense_replace": meta.opt("leading_dense_block_count", 0),
            "routed_scaling_factor": metadata_float(meta.opt("expert_weights_scale", 1.0)) or 1.0,
            "n_group": meta.opt("expert_group_count", 1) or 1,
            "topk_group": meta.opt("expert_group_used_count", 1) or 1,
            "norm_topk_prob": bool(meta.opt("expert_weights_norm", False)),
            "rms_norm_eps": metadata_float(meta.req("attention.layer_norm_rms_epsilon")),
            "rope_theta": metadata_float(meta.opt("rope.freq_base", 10000.0)),
            "max_position_embeddings": meta.req("context_length"),
            "num_nextn_predict_layers": n_mtp,
            "tie_word_embeddings": "output.weight" not in files.tensors,
            "eos_token_id": list(dict.fromkeys(i for i in ids if isinstance(i, int))),
            "pad_token_id": meta.meta.get("tokenizer.ggml.padding_token_id"),
            "torch_dtype": dtype_of.get(probe.ggml_type, "bfloat16"),
            **self.attention_config(meta, files),
        }

    def attention_config(self, meta: GGUFMetadata, files: Any) -> dict[str, Any]:
        """The attention fields of config.json from the metadata and the tensors present."""
        raise NotImplementedError
