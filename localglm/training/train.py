"""Train the packaged default model: a small glm4_moe on the Python standard library.

    python -m localglm.training.train --out localglm/data/default_model

Steps: build the corpus (`corpus.py`), train a GLM-shaped byte-level BPE (`tiny_tokenizer`), train
transformers' `Glm4MoeForCausalLM` with AdamW, balancing the experts as GLM does (after each step
every MoE layer's `e_score_correction_bias` moves by `bias_rate` towards the under-loaded experts;
the forward pass never changes it), and write the checkpoint in the hub layout (per-expert tensor
names, sharded safetensors, config.json in GLM's spelling, tokenizer, chat template) every
`--save-every` steps, so a run cut short still leaves a usable model. Seeded: the same command on
the same Python and torch gives the same weights.

With `mtp_layers` 1 (the default) the model also trains GLM's MTP block (`mtp.py`): the loss is
CE(next token) + mtp_weight * CE(token after next, through the block). `--init-from DIR` continues an
earlier checkpoint (FP8 or float, `warm_start.py`) with its tokenizer; a block it lacks starts as a
copy of the last main layer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..checkpoint.safetensors import save_safetensors_sharded
from ..checkpoint.writing import open_modes
from ..models.glm4_moe.tiny import TINY, TinySpec
from ..tiny import fp8_layout
from ..chat.tiny_tokenizer import GLM_SPECIAL_TOKENS, build_tiny_tokenizer
from .corpus import Corpus, build_corpus
from .precision import check_compute_dtype, computing_in
from .settings import require_at_least, require_choice, require_finite_loss, require_fraction, require_positive
from .mtp import PreNormHidden, attach_mtp, init_from_last_layer, main_and_mtp_loss, mtp_block_of
from .warm_start import TOKENIZER_FILES, load_into, special_ids


# Outside the package, so the float32 checkpoint never ends up in a wheel.
DEFAULT_WORK = Path.home() / ".cache" / "localglm" / "default-model-work"


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (model shape, data, optimisation)."""

    # model (a GLM-4.5-Air-like glm4_moe, scaled down)
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    moe_intermediate_size: int = 128
    n_routed_experts: int = 16
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.0
    max_position_embeddings: int = 2048
    # data
    seq_len: int = 256
    batch_size: int = 16
    chat_share: float = 0.75  # fraction of the sequences that start at a chat pair (the rest: plain code)
    agent_share: float = 0.1  # synthetic thinking / tool-call conversations added, per train chat pair
    max_code_chars: int = 6_000_000
    tokenizer_chars: int = 4_000_000
    # optimisation
    steps: int = 1300
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    bias_rate: float = 2e-2  # GLM/DeepSeek-V3 style balancing: bias += rate * sign(mean load - load)
    mtp_layers: int = 1  # GLM's MTP block (0: none; GLM checkpoints have 1)
    mtp_weight: float = 0.3  # loss = CE_main + mtp_weight * CE_mtp (DeepSeek-V3's 0.3)
    seed: int = 0
    compute_dtype: str = "bfloat16"  # float32 | bfloat16 (autocast matmuls; float32 master weights): precision.py
    # output
    weights: str = "fp8"  # fp8 (GLM-4.5-FP8 block-scaled layout) | bfloat16

    def check(self) -> None:
        """A one-line ValueError naming the first setting that cannot train (settings.py)."""
        require_at_least(self, {
            "vocab_size": 256 + len(GLM_SPECIAL_TOKENS), "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 2, "moe_intermediate_size": 1,
            "n_routed_experts": 1, "num_experts_per_tok": 1, "n_shared_experts": 0, "first_k_dense_replace": 0,
            "max_position_embeddings": 3, "seq_len": 2, "batch_size": 1, "max_code_chars": 0, "tokenizer_chars": 1,
            "steps": 1, "lr": 0, "warmup": 0, "weight_decay": 0, "bias_rate": 0, "mtp_layers": 0, "mtp_weight": 0, "seed": 0,
        })  # fmt: skip
        require_positive(self, ("grad_clip", "routed_scaling_factor"))
        require_fraction(self, ("chat_share", "agent_share", "min_lr_ratio"))
        require_choice(self, "weights", ("fp8", "bfloat16"))
        check_compute_dtype(self.compute_dtype)
        if self.mtp_layers not in (0, 1):
            raise ValueError(f"--mtp-layers {self.mtp_layers}: GLM checkpoints have 0 or 1 MTP block")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"--num-attention-heads {self.num_attention_heads}: must be a multiple of --num-key-value-heads {self.num_key_value_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"--num-experts-per-tok {self.num_experts_per_tok}: more than --n-routed-experts {self.n_routed_experts}")
        if self.first_k_dense_replace >= self.num_hidden_layers:
            raise ValueError(f"--first-k-dense-replace {self.first_k_dense_replace}: leaves no MoE layer of --num-hidden-layers {self.num_hidden_layers}")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"--seq-len {self.seq_len}: longer than --max-position-embeddings {self.max_position_embeddings}")

    def spec(self, weights: str | None = None) -> TinySpec:
        """The checkpoint's shape as a TinySpec, so config.json is spelled exactly as make-tiny spells it."""
        names = {f.name for f in fields(TinySpec)}
        kw = {k: v for k, v in asdict(self).items() if k in names}
        return TinySpec(**kw, num_nextn_predict_layers=self.mtp_layers, dtype=weights or self.weights, use_qk_norm=True)


# ---- data ----------------------------------------------------------------------------------------
class Batches:
    """Seeded batches of `seq_len + 1` token windows: chat windows start at a chat pair, code windows anywhere."""

    def __init__(self, chat: list[list[int]], code: list[int], cfg: TrainConfig, eot: int) -> None:
        self.cfg = cfg
        # One stream per kind; a window starting at a chat pair runs on into the next pairs.
        self.chat_stream = torch.tensor([t for doc in chat for t in [*doc, eot]], dtype=torch.long)
        starts, pos = [], 0
        for doc in chat:
            starts.append(pos)
            pos += len(doc) + 1
        need = cfg.seq_len + 1
        self.chat_starts = torch.tensor([s for s in starts if s + need <= len(self.chat_stream)], dtype=torch.long)
        self.code_stream = torch.tensor(code, dtype=torch.long)
        if len(self.chat_starts) == 0 or len(self.code_stream) <= need:
            raise ValueError("corpus too small for one training window")
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def next(self) -> torch.Tensor:
        cfg, need = self.cfg, self.cfg.seq_len + 1
        n_chat = round(cfg.batch_size * cfg.chat_share)
        rows = []
        for i in range(cfg.batch_size):
            if i < n_chat:
                s = int(self.chat_starts[torch.randint(len(self.chat_starts), (1,), generator=self.gen)])
                rows.append(self.chat_stream[s : s + need])
            else:
                s = int(torch.randint(len(self.code_stream) - need, (1,), generator=self.gen))
                rows.append(self.code_stream[s : s + need])
        return torch.stack(rows)


def encode_docs(tokenizer_dir: Path, docs: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


# ---- model ---------------------------------------------------------------------------------------
def hf_config(cfg: TrainConfig, special: dict[str, int]):
    from transformers import Glm4MoeConfig

    d = TINY.config_json(cfg.spec("float32"), special)
    d.pop("torch_dtype", None)
    rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta"), "partial_rotary_factor": d.pop("partial_rotary_factor")}
    d["rope_parameters"] = rope
    return Glm4MoeConfig(**d)


def build_model(cfg: TrainConfig, special: dict[str, int]) -> torch.nn.Module:
    from transformers import Glm4MoeForCausalLM

    torch.manual_seed(cfg.seed)
    model = Glm4MoeForCausalLM(hf_config(cfg, special))
    # Scaled init for the residual outputs (GPT-2 style), so deeper stacks start near the identity.
    if cfg.mtp_layers not in (0, 1):
        raise ValueError(f"mtp_layers {cfg.mtp_layers}: GLM checkpoints have 0 or 1 MTP block")
    if cfg.mtp_layers:
        attach_mtp(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj")) or name.endswith("down_proj.weight"):
                p.mul_(1 / math.sqrt(2 * cfg.num_hidden_layers))
    return model.float()


def routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    return [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


class LoadMeter:
    """Counts the tokens each expert of each MoE layer got, from the routers' outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, gate in routers(model):
            self.counts[i] = torch.zeros(gate.num_experts)
            self.handles.append(gate.register_forward_hook(self._hook(i)))

    def _hook(self, i: int):
        def hook(module, args, output) -> None:
            ids = output[2].detach().reshape(-1)
            self.counts[i] += torch.bincount(ids, minlength=module.num_experts).float()

        return hook

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def update_bias(model: torch.nn.Module, meter: LoadMeter, rate: float) -> float:
    """GLM's auxiliary-loss-free balancing; returns the worst max/mean load ratio over layers."""
    worst = 0.0
    with torch.no_grad():
        for i, gate in routers(model):
            load = meter.counts[i]
            mean = load.mean()
            gate.e_score_correction_bias += rate * torch.sign(mean - load)
            worst = max(worst, float(load.max() / mean.clamp(min=1)))
    return worst


def hub_tensors(model: torch.nn.Module, cfg: TrainConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The trained weights under GLM's hub names (per-expert gate/up/down), fp32."""
    inter = cfg.moe_intermediate_size
    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            p = name[: -len("gate_up_proj")]
            for e in range(t.shape[0]):
                yield f"{p}{e}.gate_proj.weight", t[e, :inter].contiguous()
                yield f"{p}{e}.up_proj.weight", t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            p = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                yield f"{p}{e}.down_proj.weight", t[e].contiguous()
        else:
            yield name, t


def stored_tensors(tensors: Iterable[tuple[str, torch.Tensor]], weights: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Float tensors under hub names as the checkpoint stores them: `weights` fp8 (GLM-4.5-FP8's block-scaled
    layout), bfloat16 or float32; the routers' correction biases stay float32."""
    if weights == "fp8":
        return fp8_layout(iter(tensors))
    if weights in ("bfloat16", "float32"):
        dt = getattr(torch, weights)
        return ((n, t if "e_score_correction_bias" in n else t.to(dt)) for n, t in tensors)
    raise ValueError(f"weights {weights!r}: expected fp8, bfloat16 or float32")


@contextmanager
def built_aside(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write a checkpoint into: when the block succeeds it replaces `out`
    (with a plain folder's modes: `open_modes`), when it fails it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        open_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model: torch.nn.Module, cfg: TrainConfig, tok_dir: Path, out: Path, weights: str, meta: dict) -> Path:
    """Write the hub-layout checkpoint into `out` (built aside, then swapped in)."""
    with built_aside(out) as tmp:
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy2(tok_dir / f, tmp / f)
        special = json.loads((tok_dir / "special_ids.json").read_text())
        spec = cfg.spec(weights)
        conf = TINY.config_json(spec, special)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        gen = {"eos_token_id": conf["eos_token_id"], "pad_token_id": conf["pad_token_id"], "temperature": 0.6, "top_p": 0.95, "do_sample": True}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "localglm_training.json").write_text(json.dumps({"train_config": asdict(cfg), **meta}, indent=2) + "\n")
        save_safetensors_sharded(stored_tensors(hub_tensors(model, cfg), weights), tmp, max_shard_bytes=8_000_000, metadata={"format": "pt"})
    return Path(out)


# ---- loop ----------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def eval_loss(model: torch.nn.Module, docs: list[list[int]], seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token loss over the first `max_windows` windows of the concatenated `docs`."""
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    n = min(max_windows, (len(stream) - 1) // seq_len)
    if n < 1:
        return float("nan")
    model.eval()
    total = 0.0
    for i in range(0, n, 8):
        rows = torch.stack([stream[j * seq_len : j * seq_len + seq_len + 1] for j in range(i, min(n, i + 8))])
        out = model(rows[:, :-1])
        total += torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), rows[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (n * seq_len)


def prepare(cfg: TrainConfig, work: Path, corpus: Corpus, log, init_from: Path | None = None) -> tuple[Path, dict[str, int]]:
    tok_dir = work / "tokenizer"
    if init_from is not None:
        tok_dir.mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            shutil.copy2(Path(init_from) / f, tok_dir / f)
        special = special_ids(tok_dir / "tokenizer.json")
        (tok_dir / "special_ids.json").write_text(json.dumps(special, indent=2) + "\n")
        log(f"tokenizer and chat template: {init_from}'s")
        return tok_dir, special
    special = build_tiny_tokenizer(tok_dir, vocab_size=cfg.vocab_size, corpus=corpus.tokenizer_lines(cfg.tokenizer_chars))
    (tok_dir / "special_ids.json").write_text(json.dumps(special, indent=2) + "\n")
    log(f"tokenizer: {cfg.vocab_size} tokens ({len(GLM_SPECIAL_TOKENS)} special) in {tok_dir}")
    return tok_dir, special


def train(cfg: TrainConfig, out: Path, work: Path, *, corpus: Corpus | None = None, save_every: int = 100,
          threads: int | None = None, max_minutes: float | None = None, eval_windows: int = 64, log=print,
          init_from: Path | None = None) -> dict:  # fmt: skip
    """Run the whole pipeline; returns a summary dict (losses, timings, parameter counts)."""
    t_start = time.time()
    cfg.check()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = corpus or build_corpus(max_code_chars=cfg.max_code_chars, agent_share=cfg.agent_share, seed=cfg.seed)
    log(f"corpus: {len(corpus.train_chat)} chat pairs + {len(corpus.train_code)} code files (train), "
        f"{len(corpus.heldout_chat)} + {len(corpus.heldout_code)} held out")  # fmt: skip
    tok_dir, special = prepare(cfg, work, corpus, log, init_from)
    eot = special["<|endoftext|>"]
    chat = encode_docs(tok_dir, corpus.train_chat)
    code = [t for d in encode_docs(tok_dir, corpus.train_code) for t in [*d, eot]]
    held_chat = [[*d, eot] for d in encode_docs(tok_dir, corpus.heldout_chat)]
    held_code = [[*d, eot] for d in encode_docs(tok_dir, corpus.heldout_code)]
    log(f"tokens: chat {sum(map(len, chat))}, code {len(code)}, held-out chat {sum(map(len, held_chat))}, code {sum(map(len, held_code))}")
    batches = Batches(chat, code, cfg, eot)
    model = build_model(cfg, special)
    if init_from is not None:
        fresh = load_into(model, init_from)
        if fresh and mtp_block_of(model) is not None:
            init_from_last_layer(model)
        log(f"weights: {init_from} ({len(fresh)} new tensors{', the MTP block a copy of the last layer' if fresh else ''})")
    block = mtp_block_of(model)
    mtp_params = sum(p.numel() for p in block.parameters()) if block is not None else 0
    n_params = sum(p.numel() for p in model.parameters()) - mtp_params  # the main model's
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    active = n_params - cfg.vocab_size * cfg.hidden_size - n_moe * per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    log(f"model: {n_params / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token (embedding excluded)"
        + (f", MTP block {mtp_params / 1e6:.2f}M" if mtp_params else ""))
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n], "weight_decay": cfg.weight_decay},
            {"params": [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n], "weight_decay": 0.0},
        ],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    meter = LoadMeter(model)
    capture = PreNormHidden(model)
    history, mtp_history = [], []
    t0, cpu0 = time.time(), time.process_time()
    tokens_per_step = cfg.batch_size * cfg.seq_len
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        rows = batches.next()
        meter.reset()
        with computing_in(cfg.compute_dtype):
            loss, mtp_loss = main_and_mtp_loss(model, rows, capture)
        total = loss if mtp_loss is None else loss + cfg.mtp_weight * mtp_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        imbalance = update_bias(model, meter, cfg.bias_rate)
        history.append(loss.item())
        require_finite_loss(history[-1], step + 1, "training")
        if mtp_loss is not None:
            mtp_history.append(mtp_loss.item())
        done = step + 1
        if done % 10 == 0 or done == cfg.steps:
            el = time.time() - t0
            mtp_note = f" mtp {sum(mtp_history[-10:]) / len(mtp_history[-10:]):.3f}" if mtp_history else ""
            log(f"step {done}/{cfg.steps} loss {sum(history[-10:]) / len(history[-10:]):.3f}{mtp_note} lr {lr_at(step, cfg):.2e} "
                f"max/mean expert load {imbalance:.2f} {done * tokens_per_step / el:.0f} tok/s {el / 60:.1f} min "
                f"(cpu {(time.process_time() - cpu0) / 60:.1f} min, load {os.getloadavg()[0]:.1f})")  # fmt: skip
        out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes
        if done % save_every == 0 or done == cfg.steps or out_of_time:
            held = eval_loss(model, held_chat, cfg.seq_len, min(8, eval_windows))
            meta = {"steps_done": done, "train_loss_last10": sum(history[-10:]) / len(history[-10:]), "heldout_chat_loss": held,
                    "mtp_loss_last10": sum(mtp_history[-10:]) / len(mtp_history[-10:]) if mtp_history else None,
                    "init_from": str(init_from) if init_from is not None else None,
                    "train_seconds": time.time() - t0, "train_cpu_seconds": time.process_time() - cpu0, "parameters": n_params, "active_parameters": active, "mtp_parameters": mtp_params}  # fmt: skip
            save_checkpoint(model, cfg, tok_dir, out, cfg.weights, meta)
            save_checkpoint(model, cfg, tok_dir, work / "checkpoint-float32", "float32", meta)
            log(f"saved step {done} to {out} (held-out chat loss {held:.3f}, ppl {math.exp(held):.2f})")
        if out_of_time:
            log(f"--max-minutes {max_minutes} reached: stopped after step {done} of {cfg.steps}")
            break
    meter.close()
    capture.close()
    train_s = time.time() - t0
    held_chat_loss = eval_loss(model, held_chat, cfg.seq_len, eval_windows)
    held_code_loss = eval_loss(model, held_code, cfg.seq_len, eval_windows)
    summary = {
        "steps": len(history), "train_seconds": train_s, "train_cpu_seconds": time.process_time() - cpu0, "total_seconds": time.time() - t_start, "tokens_seen": len(history) * tokens_per_step,
        "parameters": n_params, "active_parameters": active, "first_loss": history[0], "last_loss": sum(history[-10:]) / len(history[-10:]),
        "heldout_chat_ppl": math.exp(held_chat_loss), "heldout_code_ppl": math.exp(held_code_loss), "loss_history": history,
        "mtp_loss_history": mtp_history,
    }  # fmt: skip
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"done: {train_s / 60:.1f} min training, held-out ppl chat {summary['heldout_chat_ppl']:.2f} code {summary['heldout_code_ppl']:.2f}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m localglm.training.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory (rewritten at every save)")
    ap.add_argument("--work", type=Path, default=None, help=f"tokenizer, float32 checkpoint and summary (default: {DEFAULT_WORK})")
    ap.add_argument("--save-every", type=int, default=260, help="steps between checkpoint rewrites (default: 260)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--init-from", type=Path, default=None,
                    help="continue this checkpoint's weights (hub layout, FP8 or float) with its tokenizer and chat template")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much training time; not reproducible")
    for f in fields(TrainConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default, help=f"(default: {f.default})")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    work = args.work or DEFAULT_WORK
    try:
        cfg.check()
    except ValueError as e:
        ap.error(str(e))

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if args.init_from is not None and not (args.init_from / "config.json").is_file():
        ap.error(f"--init-from {args.init_from}: no config.json there")
    if args.save_every < 1:
        ap.error(f"--save-every {args.save_every}: must be at least 1")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: must be at least 1")
    if args.max_minutes is not None and not args.max_minutes > 0:
        ap.error(f"--max-minutes {args.max_minutes}: must be above 0")
    try:
        train(cfg, args.out, work, save_every=args.save_every, threads=args.threads, max_minutes=args.max_minutes, log=log,
              init_from=args.init_from)  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
