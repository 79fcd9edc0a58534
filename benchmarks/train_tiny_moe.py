"""Train a small GLM-4.x-shaped MoE on Python stdlib text so its routers learn something.

Used by bench_offload.py to get routing traces that look like a trained model's (skewed, with
temporal locality) rather than a random model's. Plain torch on the model's own functional
forward: the checkpoint is loaded in float32, every weight is made a leaf with requires_grad,
and Adam runs on next-token cross-entropy. Load balance follows GLM's aux-loss-free scheme: the
router's correction bias is nudged against each expert's load after every step.

    python benchmarks/train_tiny_moe.py OUT_DIR [--steps 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localglm.loader import load  # noqa: E402
from localglm.checkpoint.safetensors import save_safetensors_sharded  # noqa: E402
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny  # noqa: E402
from localglm.chat.tiny_tokenizer import corpus_text  # noqa: E402

SPEC = dict(
    vocab_size=1024, hidden_size=96, intermediate_size=192, num_hidden_layers=7, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, moe_intermediate_size=48, n_routed_experts=32, num_experts_per_tok=4,
    n_shared_experts=1, first_k_dense_replace=1, dtype="float32", max_position_embeddings=4096,
)  # fmt: skip


def named_weights(model) -> dict[str, torch.Tensor]:
    """Hub names -> the trained tensors (q/k/v and gate/up split back out)."""
    cfg, w, ex = model.config, model.net.w, model.net.experts
    hd = cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm, "lm_head.weight": w.lm_head}

    def mlp(prefix: str, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        inter = gate_up.shape[0] // 2
        out[f"{prefix}.gate_proj.weight"] = gate_up[:inter]
        out[f"{prefix}.up_proj.weight"] = gate_up[inter:]
        out[f"{prefix}.down_proj.weight"] = down

    for i, lw in enumerate(w.layers):
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        out[f"{p}.input_layernorm.weight"] = lw.input_norm
        out[f"{p}.post_attention_layernorm.weight"] = lw.post_attention_norm
        for name, t in zip(("q", "k", "v"), lw.attn.qkv_weight.split([q, kv, kv])):
            out[f"{a}.{name}_proj.weight"] = t
        if lw.attn.qkv_bias is not None:
            for name, t in zip(("q", "k", "v"), lw.attn.qkv_bias.split([q, kv, kv])):
                out[f"{a}.{name}_proj.bias"] = t
        out[f"{a}.o_proj.weight"] = lw.attn.o_weight
        if lw.attn.q_norm is not None:
            out[f"{a}.q_norm.weight"] = lw.attn.q_norm
            out[f"{a}.k_norm.weight"] = lw.attn.k_norm
        if lw.dense_mlp is not None:
            mlp(f"{p}.mlp", lw.dense_mlp.gate_up, lw.dense_mlp.down)
        else:
            out[f"{p}.mlp.gate.weight"] = lw.router.weight
            out[f"{p}.mlp.gate.e_score_correction_bias"] = lw.router.correction_bias
            if lw.shared is not None:
                mlp(f"{p}.mlp.shared_experts", lw.shared.gate_up, lw.shared.down)
            for e in range(cfg.n_routed_experts):
                mlp(f"{p}.mlp.experts.{e}", ex.gate_up[i][e], ex.down[i][e])
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def leaves(model) -> list[torch.Tensor]:
    """Make every weight a trainable leaf, in place in the model's structures."""
    w, ex = model.net.w, model.net.experts
    params: list[torch.Tensor] = []

    def leaf(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone().requires_grad_(True)
        params.append(t)
        return t

    w.embed, w.final_norm, w.lm_head = leaf(w.embed), leaf(w.final_norm), leaf(w.lm_head)
    for lw in w.layers:
        lw.input_norm, lw.post_attention_norm = leaf(lw.input_norm), leaf(lw.post_attention_norm)
        at = lw.attn
        at.qkv_weight, at.o_weight = leaf(at.qkv_weight), leaf(at.o_weight)
        if at.qkv_bias is not None:
            at.qkv_bias = leaf(at.qkv_bias)
        if at.q_norm is not None:
            at.q_norm, at.k_norm = leaf(at.q_norm), leaf(at.k_norm)
        for m in (lw.dense_mlp, lw.shared):
            if m is not None:
                m.gate_up, m.down = leaf(m.gate_up), leaf(m.down)
        if lw.router is not None:
            lw.router.weight = leaf(lw.router.weight)
    for i in list(ex.gate_up):
        ex.gate_up[i], ex.down[i] = leaf(ex.gate_up[i]), leaf(ex.down[i])
    return params


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    base = out.with_name(out.name + ".init")
    make_tiny(base, TinySpec(**SPEC), overwrite=True)
    model = load(base, dtype="float32")
    text = corpus_text()
    ids = torch.tensor(model.tokenizer.encode(text), dtype=torch.long)
    print(f"corpus {len(text)} chars -> {len(ids)} tokens", flush=True)
    params = leaves(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    net, cfg = model.net, model.config
    loads: dict[int, torch.Tensor] = {}
    inner = net.experts.forward

    def counting_forward(layer, x, expert_ids, expert_weights):
        loads[layer] = loads.get(layer, 0) + torch.bincount(expert_ids.reshape(-1), minlength=cfg.n_routed_experts)
        return inner(layer, x, expert_ids, expert_weights)

    net.experts.forward = counting_forward
    t0 = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,))
        batch = torch.stack([ids[s : s + args.seq + 1] for s in starts])
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        loads.clear()
        hidden = net.hidden_states(batch[:, :-1])
        loss = F.cross_entropy(net.lm_head(hidden).reshape(-1, cfg.vocab_size).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():  # aux-loss-free balancing (DeepSeek-V3 / GLM): bias up for underloaded experts
            for i, count in loads.items():
                lw = net.w.layers[i]
                lw.router.correction_bias += 1e-3 * torch.sign(count.float().mean() - count.float())
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
    net.experts.forward = inner
    tensors = named_weights(model)
    import shutil

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_safetensors_sharded(tensors, out, metadata={"format": "pt"})
    shutil.rmtree(base)
    print(f"wrote {out} (final loss {loss.item():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
