"""Warm start: read a hub-layout glm4_moe checkpoint (FP8 block-scaled or float) into the training model.

`--init-from DIR` continues an earlier run's model: the weights are dequantized (fp8 times its
`weight_scale_inv` blocks), the per-expert tensors are stacked back into transformers' fused
`gate_up_proj` / `down_proj`, and the checkpoint's tokenizer and chat template are reused (a new
tokenizer would renumber every token the weights were trained on).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoint.safetensors import dequantize_scaled, scale_layout
from ..chat.tiny_tokenizer import GLM_SPECIAL_TOKENS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def read_stored_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's shards at `path`, as stored (fp8 weights and their scales apart)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                raw[name] = sf.get_tensor(name)
    return raw


def read_hub_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at `path` as float32, fp8 weights dequantized, under hub names."""
    path = Path(path)
    raw = read_stored_tensors(path)
    conf = json.loads((path / "config.json").read_text())
    block = (conf.get("quantization_config") or {}).get("weight_block_size", [128, 128])
    out = {}
    for name, t in raw.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = raw.get(name[: -len("weight")] + "weight_scale_inv") if name.endswith(".weight") else None
        if scale is not None:
            layout = scale_layout(t.shape, scale.shape, block)
            if layout is None:
                raise ValueError(f"{path}: {name}: scale {tuple(scale.shape)} fits no block layout of weight {tuple(t.shape)}")
            out[name] = dequantize_scaled(t, scale, layout, torch.float32)
        else:
            out[name] = t.float()
    return out


def fused_state_dict(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub names -> transformers' Glm4Moe state dict (experts stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in hub.items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[name] = t
    for prefix, per in experts.items():
        ids = sorted(per)
        if ids != list(range(len(ids))):
            raise ValueError(f"{prefix}: expert numbers {ids[:4]}... are not 0..{len(ids) - 1}")
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in ids])
        out[prefix + "down_proj"] = torch.stack([per[e]["down_proj"] for e in ids])
    return out


def load_into(model: torch.nn.Module, path: Path) -> list[str]:
    """Load the checkpoint at `path` into `model`; returns the model's tensors it did not hold (the new
    MTP block's, when it had none). Any checkpoint tensor the model lacks, or of another shape, is an error."""
    state = fused_state_dict(read_hub_weights(path))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{path}: tensors the training model does not have: {', '.join(unknown[:4])}")
    for name, t in state.items():
        if own[name].shape != t.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the training model {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, t in state.items():
            own[name].copy_(t)
    return sorted(set(own) - set(state))


def special_ids(tokenizer_json: Path) -> dict[str, int]:
    """The GLM special tokens' ids in an existing tokenizer.json (as `build_tiny_tokenizer` returns them)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = {t: tok.token_to_id(t) for t in GLM_SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{tokenizer_json}: lacks the special tokens {', '.join(missing[:4])}")
    return ids
