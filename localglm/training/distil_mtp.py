"""Self-distil a trained model's MTP block on the model's own replies (the draft head learns to agree).

    python -m localglm.training.distil_mtp --model localglm/data/default_model --out localglm/data/default_model

Why: `train.py` trains the block as GLM does, on the data: CE of the token after next. A draft is accepted
when it is what the *main model* would say, and on requests it has not seen the default model's block
trained on data agreed with the main model's greedy token on 0.63 of reply positions (0.85 on training
requests, which both have memorized). So here the main model is frozen and the block alone (eh_proj, its
norms, its decoder layer; the head is the main lm_head) is trained on CE against the main model's own
distribution of the token after next, on replies the main model wrote itself (EAGLE's and Medusa-2's
self-distillation):

1. requests: sampled from the model itself after the chat template's user prefix (temperature 1, top-p
   0.95, seeded), ending at `<|assistant|>`: prompts in its own distribution that it has not memorized,
   with no data from outside the checkpoint;
2. replies: its greedy continuation through localglm's engine (no speculation);
3. the block trained on the reply positions (the main model's transformers twin, float32, computes h_i
   and the targets);
4. written back: only the block's tensors change, stored as the checkpoint stores them (FP8 blocks where
   it does); every other tensor is copied as it was, byte for byte. The run's settings and the greedy
   acceptance on held-out requests before and after go into `localglm_training.json`.

Seeded: the same command, Python and torch give the same block. It needs the checkpoint's
`localglm_training.json` (the shape `train.py` built), so it takes checkpoints trained here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoint.safetensors import save_safetensors_sharded
from .mtp import PreNormHidden, mtp_block_of, mtp_logits
from .precision import check_compute_dtype, computing_in
from .settings import require_at_least, require_finite_loss
from .train import TrainConfig, build_model, built_aside, hub_tensors, stored_tensors
from .warm_start import load_into, read_stored_tensors, special_ids

Log = Callable[[str], None]


@dataclass
class DistilConfig:
    """Everything that decides the distilled block."""

    requests: int = 1000  # requests the model samples for itself
    request_tokens: int = 48  # the longest request sampled (longer ones are dropped)
    reply_tokens: int = 64  # greedy reply tokens per request
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    seed: int = 0
    compute_dtype: str = "bfloat16"  # float32 | bfloat16: the forwards under autocast (precision.py)

    def check(self) -> None:
        """A one-line ValueError naming the first setting that cannot distil (settings.py)."""
        require_at_least(self, {"requests": 1, "request_tokens": 1, "reply_tokens": 1, "steps": 1, "batch_size": 1, "lr": 0, "warmup": 0, "seed": 0})
        check_compute_dtype(self.compute_dtype)


def train_config_of(path: Path) -> TrainConfig:
    """The TrainConfig `train.py` recorded in the checkpoint (its shape); a clear error for other checkpoints."""
    meta_path = Path(path) / "localglm_training.json"
    if not meta_path.is_file():
        raise ValueError(f"{path}: no localglm_training.json (distil_mtp takes checkpoints trained by localglm.training.train)")
    recorded = json.loads(meta_path.read_text()).get("train_config", {})
    names = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in recorded.items() if k in names})
    if not cfg.mtp_layers:
        raise ValueError(f"{path}: the checkpoint has no MTP block to distil (mtp_layers 0)")
    return cfg


def user_prefix(engine: Any) -> list[int]:
    """The chat template's tokens before a user message's content (what a sampled request follows)."""
    marker = "\x00REQUEST\x00"
    ids = engine.encode_chat([{"role": "user", "content": marker}]).ids
    text = engine.tokenizer.decode(ids)
    want = text[: text.index(marker)]
    for n in range(len(ids), 0, -1):
        if engine.tokenizer.decode(ids[:n]) == want:
            return ids[:n]
    raise ValueError("the chat template puts no tokens before the user's content")


def sample_requests(engine: Any, cfg: DistilConfig, log: Log) -> list[str]:
    """Requests the model writes itself after the user prefix, seeded one by one; those it does not end
    with <|assistant|> within `request_tokens` are dropped."""
    from ..sampling import SamplingParams

    end = engine.tokenizer.token_to_id("<|assistant|>")
    if end is None:
        raise ValueError("the tokenizer has no <|assistant|> token")
    prefix, out = user_prefix(engine), []
    t0 = time.time()
    for i in range(cfg.requests):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=cfg.seed * 1_000_003 + i)
        ids = list(engine.stream_tokens(prefix, max_new_tokens=cfg.request_tokens, sampling=params, stop_ids={end}, reuse_prefix=False))
        text = engine.tokenizer.decode(ids[:-1]).strip() if ids and ids[-1] == end else ""
        if text:
            out.append(text)
        if (i + 1) % 250 == 0:
            log(f"requests: {i + 1}/{cfg.requests} sampled, {len(out)} kept ({time.time() - t0:.0f} s)")
    return out


def greedy_replies(engine: Any, requests: list[str], cfg: DistilConfig, log: Log) -> list[tuple[list[int], int]]:
    """(prompt + greedy reply ids, prompt length) for each request, through the engine without speculation."""
    from ..sampling import SamplingParams

    greedy, out, t0 = SamplingParams(temperature=0), [], time.time()
    for i, req in enumerate(requests):
        prompt = engine.encode_chat([{"role": "user", "content": req}]).ids
        reply = list(engine.stream_tokens(prompt, max_new_tokens=cfg.reply_tokens, sampling=greedy, reuse_prefix=False))
        out.append((prompt + reply, len(prompt)))
        if (i + 1) % 250 == 0:
            log(f"replies: {i + 1}/{len(requests)} ({sum(len(s) - p for s, p in out)} tokens, {time.time() - t0:.0f} s)")
    return out


def batch_rows(seqs: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows [B, L] and the loss mask [B, L - 2] over the positions i whose token after next
    (i + 2) is a reply token."""
    L = max(len(s) for s, _ in seqs)
    rows = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 2)
    for b, (s, p) in enumerate(seqs):
        rows[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, max(p - 2, 0) : len(s) - 2] = 1.0
    return rows, mask


def distil_block(model: torch.nn.Module, seqs: list[tuple[list[int], int]], cfg: DistilConfig, pad: int, log: Log) -> dict[str, Any]:
    """Train the MTP block alone on CE against the frozen main model's distribution of the token after
    next. Returns the loss and argmax-agreement histories (means over 25 steps)."""
    block = mtp_block_of(model)
    if block is None:
        raise ValueError("the model has no MTP block")
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(block.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    capture = PreNormHidden(model)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses, agrees, history = [], [], []
    model.eval()  # no dropout; the block's router keeps its correction bias (no balancing here)
    t0 = time.time()
    try:
        for step in range(cfg.steps):
            rows, mask = batch_rows(rng.sample(seqs, min(cfg.batch_size, len(seqs))), pad)
            L = rows.shape[1]
            with torch.no_grad(), computing_in(cfg.compute_dtype):
                logits = model(rows).logits
                hidden = capture.value
                assert hidden is not None
                target = F.softmax(logits[:, 1 : L - 1].float(), dim=-1)
            warm = min(1.0, (step + 1) / max(1, cfg.warmup))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
            with computing_in(cfg.compute_dtype):
                draft = mtp_logits(model, hidden[:, : L - 2], rows[:, 1 : L - 1])
            per_pos = -(target * F.log_softmax(draft.float(), dim=-1)).sum(-1)
            loss = (per_pos * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                agree = float(((draft.argmax(-1) == logits[:, 1 : L - 1].argmax(-1)).float() * mask).sum() / mask.sum())
            losses.append(loss.item())
            require_finite_loss(losses[-1], step + 1, "distillation")
            agrees.append(agree)
            if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
                n = len(losses[-25:])
                history.append({"step": step + 1, "loss": sum(losses[-25:]) / n, "agreement": sum(agrees[-25:]) / n})
                log(f"step {step + 1}/{cfg.steps} loss {history[-1]['loss']:.3f} agreement with the main model "
                    f"{history[-1]['agreement']:.3f} ({time.time() - t0:.0f} s)")  # fmt: skip
    finally:
        capture.close()
        for p in params:
            p.requires_grad_(False)
    return {"history": history, "train_seconds": time.time() - t0}


def block_tensors(model: torch.nn.Module, tcfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The block's tensors under hub names, in the checkpoint's storage format (train.py's)."""
    ours = ((n, t) for n, t in hub_tensors(model, tcfg) if n.startswith(block_prefix(tcfg)))
    return dict(stored_tensors(ours, tcfg.weights))


def block_prefix(tcfg: TrainConfig) -> str:
    return f"model.layers.{tcfg.num_hidden_layers}."


def write_back(src: Path, out: Path, prefix: str, block: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
    """`src` with the tensors under `prefix` (the block's) replaced by `block`, every other one as stored,
    and `record` added to its localglm_training.json under "mtp_distillation", into `out` (built aside,
    then swapped in)."""
    src, out = Path(src), Path(out)
    tensors = read_stored_tensors(src)
    old = {n for n in tensors if n.startswith(prefix)}
    if old != set(block):
        raise ValueError(f"{src}: the MTP block's tensors differ from the distilled ones ({sorted(old ^ set(block))[:3]})")
    for name, t in block.items():
        if tensors[name].shape != t.shape or tensors[name].dtype != t.dtype:
            raise ValueError(f"{src}: {name} is {tuple(tensors[name].shape)} {tensors[name].dtype}, the distilled {tuple(t.shape)} {t.dtype}")
    tensors.update(block)
    with built_aside(out) as tmp:
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        meta = json.loads((tmp / "localglm_training.json").read_text())
        meta["mtp_distillation"] = record
        (tmp / "localglm_training.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_safetensors_sharded(sorted(tensors.items()), tmp, max_shard_bytes=8_000_000, metadata={"format": "pt"})
    return out


def heldout_requests(n: int) -> list[str]:
    """The first n of the corpus' held-out requests (evaluate.py's acceptance set)."""
    from .corpus import build_corpus

    return [e.request for e in build_corpus(max_code_chars=0).heldout_examples[:n]] if n else []


def heldout_acceptance(path: Path, requests: list[str]) -> dict[int, dict[str, float]]:
    """Greedy acceptance drafting 1 and 3 tokens a step on `requests` (evaluate.py's measure)."""
    import localglm

    from .evaluate import acceptance

    return acceptance(localglm.load(path, mtp=True), requests, [1, 3])


def distil(src: Path, out: Path, cfg: DistilConfig, *, log: Log = print, eval_requests: int = 24, requests: list[str] | None = None) -> dict[str, Any]:
    """The whole run: sample requests (or take `requests`), write greedy replies, train the block, write it back."""
    import localglm

    t_start = time.time()
    cfg.check()
    tcfg = train_config_of(src)
    engine = localglm.load(src, mtp=False)
    torch.manual_seed(cfg.seed)
    requests = sample_requests(engine, cfg, log) if requests is None else requests
    if not requests:
        raise ValueError(f"{src}: the model ended none of its {cfg.requests} sampled requests with <|assistant|>")
    seqs = greedy_replies(engine, requests, cfg, log)
    log(f"data: {len(requests)} requests, {sum(len(s) - p for s, p in seqs)} reply tokens ({time.time() - t_start:.0f} s)")
    special = special_ids(Path(src) / "tokenizer.json")
    model = build_model(tcfg, special)
    load_into(model, src)
    held = heldout_requests(eval_requests)
    before = heldout_acceptance(src, held) if held else {}
    run = distil_block(model, seqs, cfg, special["<|endoftext|>"], log)
    record = {"config": asdict(cfg), "requests_kept": len(requests), "reply_tokens": sum(len(s) - p for s, p in seqs), **run,
              "total_seconds": time.time() - t_start, "acceptance_before": before}  # fmt: skip
    write_back(src, out, block_prefix(tcfg), block_tensors(model, tcfg), record)
    if held:
        record["acceptance_after"] = heldout_acceptance(out, held)
        meta_path = Path(out) / "localglm_training.json"
        meta = json.loads(meta_path.read_text())
        meta["mtp_distillation"] = {**record, "total_seconds": time.time() - t_start}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        for d in sorted(record["acceptance_after"]):
            b, a = before[d], record["acceptance_after"][d]
            log(f"draft {d}: held-out acceptance rate {b['accept_rate']:.3f} -> {a['accept_rate']:.3f}, "
                f"tokens per step {b['acceptance_length']:.2f} -> {a['acceptance_length']:.2f}")  # fmt: skip
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m localglm.training.distil_mtp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a checkpoint trained by localglm.training.train, with an MTP block")
    ap.add_argument("--out", type=Path, required=True, help="where the distilled checkpoint goes (may be --model: rewritten in place)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--eval-requests", type=int, default=24, help="held-out requests for the acceptance before and after (0: skip)")
    for f in fields(DistilConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default, help=f"(default: {f.default})")
    args = ap.parse_args(argv)
    if not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json there")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DistilConfig(**{f.name: getattr(args, f.name) for f in fields(DistilConfig)})
    try:
        cfg.check()
    except ValueError as e:
        ap.error(str(e))
    if args.eval_requests < 0:
        ap.error(f"--eval-requests {args.eval_requests}: must be at least 0")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    try:
        distil(args.model, args.out, cfg, log=log, eval_requests=args.eval_requests)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
