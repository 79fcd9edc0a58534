"""GLM's MTP (multi-token prediction, "next-n") block as a draft head, for every architecture.

Every GLM checkpoint ships `num_nextn_predict_layers` (1) extra blocks at `model.layers.{N}`, N =
num_hidden_layers. Given the main model's residual stream h_i at position i (after its last layer,
before the final norm) and the token t_{i+1}, the block computes, as llama.cpp's glm4-moe MTP graph does:

    x = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))      # embedding first, then the hidden
    x = one full decoder layer of the architecture (own KV cache, MoE with shared expert), at position i
    logits(t_{i+2}) = shared_head.head(shared_head.norm(x))   # the main lm_head when head is absent

Chained drafting feeds the block's own output stream back as the next h (how it was trained to be
chained by vLLM's and llama.cpp's proposers).

The block is built as a one-layer model of the same architecture (`cfg.mtp_block_config()`), read by
the architecture's own weight reader through a renaming reader (layer 0 -> N, model.norm ->
shared_head.norm, lm_head -> shared_head.head, embed_tokens -> the block's or the main model's), so
GQA, MLA and MLA + DSA get MTP from this one file. Its routed experts are a backend of their own
(the block's, at 8 bits by default: the recipe class "mtp"), seen by the block as layer 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..layers.experts import ExpertBackend, LayerOffset
from ..layers.kv_cache import TokenCache
from ..layers.linear import linear
from ..layers.native import RowsProduct
from ..layers.norm import rms_norm
from ..sampling import check_finite
from .arch import Arch, WeightReader
from .fused_mtp import FusedMtp
from .moe_decoder import DecoderWeights, MoeDecoder

# The block's own tensors beside its decoder layer (moe_names.MTP_TENSORS lists the optional ones too).
REQUIRED = ("eh_proj", "enorm", "hnorm", "shared_head.norm")


def mtp_block(cfg: ModelConfig) -> int | None:
    """The layer index of the (first) MTP block, None when the config declares none."""
    return cfg.num_hidden_layers if cfg.num_nextn_predict_layers > 0 else None


def has_mtp_weights(cfg: ModelConfig, has: Callable[[str], bool]) -> bool:
    """Whether a checkpoint holds the MTP block's own tensors (GGUFs converted with --no-mtp do not)."""
    return mtp_blocks_held(cfg, has) > 0


def mtp_blocks_held(cfg: ModelConfig, has: Callable[[str], bool]) -> int:
    """How many of the MTP blocks the config declares the checkpoint holds, counted from the first: a
    config.json may claim more (`num_nextn_predict_layers` 3) than the one block GLM checkpoints ship."""
    n = 0
    while n < cfg.num_nextn_predict_layers and all(has(f"model.layers.{cfg.num_hidden_layers + n}.{t}.weight") for t in REQUIRED):
        n += 1
    return n


def block_reader(reader: WeightReader, block: int, main: DecoderWeights) -> WeightReader:
    """`reader` renamed so that a one-layer model's names read the MTP block at `block`: layer 0 is the
    block's decoder layer, `model.norm` its shared_head.norm, `lm_head` its shared_head.head (else the
    main lm_head) and `model.embed_tokens` its own embedding (else the main one, not read twice)."""
    p = f"model.layers.{block}"
    own = {
        "model.norm.weight": f"{p}.shared_head.norm.weight",
        "lm_head.weight": f"{p}.shared_head.head.weight",
        "model.embed_tokens.weight": f"{p}.embed_tokens.weight",
    }
    shared = {"lm_head.weight": main.lm_head, "model.embed_tokens.weight": main.embed}

    def rename(name: str) -> str:
        if name.startswith("model.layers.0."):
            return p + name[len("model.layers.0") :]
        return own.get(name, name)

    def getter(inner: Callable[[str, tuple[int, ...]], Any]) -> Callable[[str, tuple[int, ...]], Any]:
        def get(name: str, shape: tuple[int, ...]) -> Any:
            if name in shared and not reader.has(own[name]):
                return shared[name]
            return inner(rename(name), shape)

        return get

    return WeightReader(getter(reader.get), getter(reader.get_fp32), lambda name: name in shared or reader.has(rename(name)))


@dataclass
class MtpWeights:
    eh_proj: Any  # [H, 2H] (a QuantTensor at the recipe's "mtp" bits)
    enorm: torch.Tensor
    hnorm: torch.Tensor
    decoder: DecoderWeights  # the one-layer model: embed, [block layer], shared_head.norm, head


class MtpHead:
    """The MTP block, ready to draft: `forward` runs it over (previous stream, next token) pairs and
    returns its own output stream; `logits` turns that stream into next-next-token logits."""

    def __init__(self, block: MoeDecoder, weights: MtpWeights, layer: int) -> None:
        self.block = block  # a one-layer model of the main architecture
        self.w = weights
        self.layer = layer  # N: where the block sits in the checkpoint
        self.cfg = block.cfg
        self.vocab: torch.Tensor | None = None  # the token ids `logits` scores (draft_vocab.py); None: all
        self._sub: RowsProduct | None = None  # the head's rows of `vocab`
        self._eh: RowsProduct | None = None  # eh_proj (a draft is one row or a few), made at first use
        self._fused: FusedMtp | None | bool = False  # the native draft step (fused_mtp.py); False: not built yet

    @property
    def rows_separable(self) -> bool:
        """Whether a draft vocabulary can take the head's rows apart: a float head, not a quantized one."""
        return isinstance(self.block.w.lm_head, torch.Tensor)

    def set_vocab(self, ids: Sequence[int] | None) -> None:
        """Score only these token ids when drafting (FR-Spec: draft_vocab.py), the rest at -inf; None:
        the whole head."""
        head = self.block.w.lm_head
        self._fused = False  # its head rows change
        if ids is None:
            self.vocab, self._sub = None, None
            return
        if not self.rows_separable:
            raise NotImplementedError("a draft vocabulary over a quantized lm_head (lm_head_bits) is not implemented: "
                                      "draft with the whole head (draft_vocab=0, --draft-vocab 0)")  # fmt: skip
        self.vocab = torch.tensor(sorted(set(ids)), dtype=torch.long, device=head.device)
        self._sub = RowsProduct(head[self.vocab].contiguous(), self.block.dtype)

    def new_cache(self, max_tokens: int) -> TokenCache:
        return self.block.new_cache(max_tokens)

    def fused(self) -> FusedMtp | None:
        """The native draft step (models/fused_mtp.py), built at first use and again when the weights or
        the draft vocabulary change; None where the kernels do not take the block."""
        if self._fused is False or (self._fused is not None and not self._fused.current()):
            self._fused = FusedMtp.build(self)
        return self._fused

    def draft_greedy(self, prev: torch.Tensor, next_ids: list[int], cache: TokenCache, start: int, depth: int) -> tuple[list[int], torch.Tensor] | None:
        """`forward` over the pairs (prev [T, H], next_ids) at start.., then `depth` drafts, each
        `greedy` of the last stream, chained through `forward` (cache entries after the pairs'), in one
        native call. -> (drafts, streams [T + max(depth - 1, 0), H]: the pairs' outputs, then each
        chained call's); None where the native path does not take it (then use forward and greedy)."""
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (prev, self.w.eh_proj)):
            return None
        fused = self.fused()
        return None if fused is None else fused.run(prev, next_ids, cache, start, depth)

    def forward(self, prev: torch.Tensor, next_ids: torch.Tensor, cache: TokenCache | None, start: int) -> torch.Tensor:
        """prev [1, T, H]: the streams at positions start..start+T-1 (the main model's residual, or this
        block's own output when chaining); next_ids [1, T]: the token after each. -> output streams [1, T, H]."""
        if cache is not None and prev.dim() == 3 and prev.shape[0] == 1 and next_ids.shape[0] == 1:
            out = self.draft_greedy(prev[0], next_ids[0].tolist(), cache, start, 0)
            if out is not None:
                return out[1].unsqueeze(0)
        eps = self.cfg.rms_norm_eps
        e = rms_norm(F.embedding(next_ids, self.block.w.embed), self.w.enorm, eps)
        h = rms_norm(prev.to(e.dtype), self.w.hnorm, eps)
        if self._eh is None or self._eh.w is not self.w.eh_proj:
            self._eh = RowsProduct(self.w.eh_proj, self.block.dtype)
        x = self._eh(torch.cat([e, h], dim=-1), self.block.fused_prefill_max)
        return self.block.run_layers(x, cache, start)

    def _vocab_scores(self, stream: torch.Tensor) -> torch.Tensor:
        """Float32 scores [rows, len(vocab)] of the draft vocabulary's tokens for streams [..., H]: each
        the number the whole head gives it (the same one-row products)."""
        assert self._sub is not None
        normed = rms_norm(stream, self.block.w.final_norm, self.cfg.rms_norm_eps)
        return self._sub(normed.reshape(-1, normed.shape[-1]), self.block.fused_prefill_max).float()

    def greedy(self, stream: torch.Tensor) -> int:
        """argmax of `logits(stream)` for one stream [H] (ties to the lowest id, as torch.argmax of the
        whole row), from the draft vocabulary's scores alone: no vocabulary-wide row is formed."""
        if self._sub is None:
            lg = self.logits(stream)
            check_finite(lg)
            return int(lg.argmax())
        sub = self._vocab_scores(stream)[0]
        check_finite(sub)
        assert self.vocab is not None
        return int(self.vocab[int(sub.argmax())])  # vocab ascending: the first maximum is the lowest id

    def logits(self, stream: torch.Tensor, full: bool = False) -> torch.Tensor:
        """Float32 logits [..., vocab_size] of the token after next from output streams [..., H]: the
        head's, or with a draft vocabulary (`set_vocab`, unless `full`) its rows' alone and -inf elsewhere."""
        if self._sub is None or full:
            return self.block.lm_head(rms_norm(stream, self.block.w.final_norm, self.cfg.rms_norm_eps)).float()
        sub = self._vocab_scores(stream)
        out = torch.full((sub.shape[0], self.cfg.vocab_size), float("-inf"), dtype=torch.float32, device=sub.device)
        out[:, self.vocab] = sub
        return out.reshape(*stream.shape[:-1], self.cfg.vocab_size)


def load_mtp_head(
    arch: Arch,
    cfg: ModelConfig,
    reader: WeightReader,
    main: DecoderWeights,
    experts: Callable[[ModelConfig, int, WeightReader], ExpertBackend],
    device: torch.device,
) -> MtpHead:
    """Read the MTP block at layer N and build its head. `experts(block_cfg, N, block_reader)` loads the
    block's routed experts (the loader's choice: quantized blobs, GGUF Q8_0 as stored, or floats) as the
    one-layer model's layer 0 (`LayerOffset` shows experts stored as layer N so)."""
    block = mtp_block(cfg)
    if block is None:
        raise ValueError("the config declares no MTP block (num_nextn_predict_layers is 0)")
    h = cfg.hidden_size
    sub_cfg = cfg.mtp_block_config()
    r = block_reader(reader, block, main)
    p = f"model.layers.{block}"
    weights = MtpWeights(
        eh_proj=reader.get(f"{p}.eh_proj.weight", (h, 2 * h)),
        enorm=reader.get(f"{p}.enorm.weight", (h,)),
        hnorm=reader.get(f"{p}.hnorm.weight", (h,)),
        decoder=arch.model.load_weights(sub_cfg, r),
    )
    model = arch.model.build(sub_cfg, weights.decoder, experts(sub_cfg, block, r), device)
    if not isinstance(model, MoeDecoder):
        raise NotImplementedError(f"MTP drafting needs a MoeDecoder-based architecture; {arch.model_type} builds {type(model).__name__}")
    # the block's input is a stream, not token ids: MoeDecoder.run_layers hands it to the native layers (fused_decode.forward_stream)
    return MtpHead(model, weights, block)
