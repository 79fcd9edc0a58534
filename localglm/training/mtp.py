"""GLM's MTP (next-n) block for training: the module, its next-next-token loss and its initialisation.

The block is trained as GLM-4.5 and DeepSeek-V3 train it, and as `localglm/models/mtp.py` runs it:
for position i, with h_i the main model's last hidden state before the final norm,

    x = eh_proj(cat(enorm(embed(t_{i+1})), hnorm(h_i)))     # embedding first, then the hidden
    x = one full Glm4Moe decoder layer (attention + MoE with shared expert), causal, at position i
    logits(t_{i+2}) = lm_head(shared_head.norm(x))           # the main model's embedding and lm_head

and the loss is CE_main + mtp_weight * CE_mtp. `MtpBlock` is a transformers decoder layer with the
block's own tensors added, appended to `model.model.layers` as layer N = num_hidden_layers: its
state-dict names are the hub names (`model.layers.N.eh_proj.weight`, `...shared_head.norm.weight`,
`...mlp.gate.e_score_correction_bias`), its router is balanced by the same bias updates as the
main layers', and transformers' own forward never runs it (it stops at num_hidden_layers).
"""

from __future__ import annotations

import torch

from .losses import linear_cross_entropy


def _decoder_layer_class():
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

    return Glm4MoeDecoderLayer


def _rms_norm(hidden: int, eps: float) -> torch.nn.Module:
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRMSNorm

    return Glm4MoeRMSNorm(hidden, eps=eps)


class SharedHead(torch.nn.Module):
    """`shared_head.norm` (GLM's checkpoints name it so; the head itself is the main lm_head)."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = _rms_norm(hidden, eps)


def make_mtp_block(config) -> torch.nn.Module:
    """A Glm4Moe decoder layer at index num_hidden_layers plus eh_proj, enorm, hnorm and shared_head."""
    base = _decoder_layer_class()

    class MtpBlock(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(config, config.num_hidden_layers)
            h, eps = config.hidden_size, config.rms_norm_eps
            self.enorm = _rms_norm(h, eps)
            self.hnorm = _rms_norm(h, eps)
            self.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
            self.shared_head = SharedHead(h, eps)

    block = MtpBlock()
    init_block_weights(block, config.initializer_range)
    return block


def init_block_weights(block: torch.nn.Module, std: float) -> None:
    """Initialise every tensor of a new block explicitly (norms 1, biases and the router's correction bias
    0, matrices N(0, std)) from torch's seeded generator. Modules built after a transformers
    `from_pretrained` in the same process may otherwise keep the uninitialised memory its no-init
    loading context leaves behind (seen as NaN losses)."""
    with torch.no_grad():
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if "e_score_correction_bias" in name or (t.ndim == 1 and name.endswith(".bias")):
                t.zero_()
            elif t.ndim == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, std)


def attach_mtp(model: torch.nn.Module) -> torch.nn.Module:
    """Append one MTP block to `model.model.layers` (a Glm4MoeForCausalLM) and return it."""
    block = make_mtp_block(model.config)
    model.model.layers.append(block)
    return block


def mtp_block_of(model: torch.nn.Module) -> torch.nn.Module | None:
    layers = model.model.layers
    n = model.config.num_hidden_layers
    return layers[n] if len(layers) > n else None


def init_from_last_layer(model: torch.nn.Module) -> None:
    """Warm start for a block added to a trained model: its decoder layer is a copy of the last main
    layer (attention, experts, router and its bias) with its residual-branch outputs (o_proj, the
    experts' and the shared expert's down_proj) zeroed, shared_head.norm a copy of the final norm, the
    input norms ones and eh_proj = [0 | I]. So the new block starts as the identity on hnorm(h_i) and
    its first draft is the main model's own next-token distribution (a finite loss to learn from, where
    a copied layer on a stream of another scale starts far worse than uniform)."""
    block = mtp_block_of(model)
    if block is None:
        raise ValueError("the model has no MTP block to initialise")
    last = model.model.layers[model.config.num_hidden_layers - 1]
    if type(last.mlp) is not type(block.mlp):
        raise ValueError("the last main layer is dense: its weights do not fit the MTP block's MoE layer")
    own = block.state_dict()
    with torch.no_grad():
        for name, t in last.state_dict().items():
            own[name].copy_(t)
        block.shared_head.norm.weight.copy_(model.model.norm.weight)
        block.enorm.weight.fill_(1.0)
        block.hnorm.weight.fill_(1.0)
        h = model.config.hidden_size
        block.eh_proj.weight.copy_(torch.cat([torch.zeros(h, h), torch.eye(h)], dim=1))
        block.self_attn.o_proj.weight.zero_()
        block.mlp.experts.down_proj.zero_()
        block.mlp.shared_experts.down_proj.weight.zero_()


class PreNormHidden:
    """Captures the main model's last hidden state before the final norm (the norm's input)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = model.model.norm.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.value = args[0]

    def close(self) -> None:
        self.handle.remove()


def mtp_logits(model: torch.nn.Module, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """The block's logits for t_{i+2}: hidden [B, T, H] = h_0..h_{T-1} (pre-norm), next_ids [B, T] =
    t_1..t_T. Positions 0..T-1, causal attention within the window."""
    return model.lm_head(mtp_head_input(model, hidden, next_ids))


def mtp_head_input(model: torch.nn.Module, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """What the lm_head takes from the block (its output after shared_head.norm), as `mtp_logits`."""
    from transformers.masking_utils import create_causal_mask

    block = mtp_block_of(model)
    if block is None:
        raise ValueError("the model has no MTP block")
    inner = model.model
    e = block.enorm(inner.embed_tokens(next_ids))
    h = block.hnorm(hidden)
    x = block.eh_proj(torch.cat([e, h], dim=-1))
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos)
    x = block(x, attention_mask=mask, position_ids=pos, position_embeddings=inner.rotary_emb(x, pos))
    return block.shared_head.norm(x)


def main_and_mtp_loss(model: torch.nn.Module, rows: torch.Tensor, capture: PreNormHidden) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(CE of the main model on rows[:, 1:], CE of the MTP block on rows[:, 2:]) for token rows [B, T+1].
    Both through the lm_head by `linear_cross_entropy` (no [tokens, vocab] logits kept for autograd)."""
    head = model.lm_head
    if head.bias is not None:
        raise ValueError("the lm_head has a bias; GLM's has none")
    normed = model.model(rows[:, :-1]).last_hidden_state
    main = linear_cross_entropy(normed.flatten(0, 1), head.weight, rows[:, 1:].flatten())
    if mtp_block_of(model) is None:
        return main, None
    hidden = capture.value
    assert hidden is not None
    t = rows.shape[1] - 1
    x = mtp_head_input(model, hidden[:, : t - 1], rows[:, 1:t])
    mtp = linear_cross_entropy(x.flatten(0, 1), head.weight, rows[:, 2:].flatten())
    return main, mtp
