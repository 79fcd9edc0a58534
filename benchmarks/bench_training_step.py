"""What one training step of the default model costs, MTP block included, with and without what keeps its
retraining inside 45 minutes on 2 cores: bf16 autocast and the chunked lm_head cross entropy.

    python benchmarks/bench_training_step.py                  # the shipped shape, batch 16 x 256, 2 threads
    python benchmarks/bench_training_step.py --rounds 8 --threads 1

Three ways to compute the same loss (CE of the next token + 0.3 x CE of the token after next, through the
MTP block), each with AdamW, gradient clipping and the experts' bias update as `train.py` runs them:
- "float32, autograd CE": the forward in float32, `F.cross_entropy` on the lm_head's logits (the peer: how
  the model was trained before);
- "bf16, autograd CE": the forward under bf16 autocast, the same logits and `F.cross_entropy`;
- "bf16, chunked CE": what `train.py` runs now (`losses.linear_cross_entropy`).
Each has its own model from the same seed, on the same random batches; each round times one step of each,
in a new random order, and the figure is the median over the rounds (the first two rounds are warm-up).
Figures move 10-20% with the machine's other load: compare them within one run.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

from localglm.chat.tiny_tokenizer import GLM_SPECIAL_TOKENS
from localglm.training.mtp import PreNormHidden, main_and_mtp_loss, mtp_logits
from localglm.training.precision import computing_in
from localglm.training.train import LoadMeter, TrainConfig, build_model, update_bias


def autograd_losses(model: torch.nn.Module, rows: torch.Tensor, capture: PreNormHidden) -> tuple[torch.Tensor, torch.Tensor]:
    """The losses as computed before the chunked CE: full logits, then F.cross_entropy."""
    logits = model(rows[:, :-1]).logits
    main = F.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())
    t = rows.shape[1] - 1
    assert capture.value is not None
    m_logits = mtp_logits(model, capture.value[:, : t - 1], rows[:, 1:t])
    return main, F.cross_entropy(m_logits.flatten(0, 1).float(), rows[:, 2:].flatten())


class Trainer:
    """One model and its optimiser, stepping as train.py steps."""

    def __init__(self, cfg: TrainConfig, dtype: str, chunked: bool) -> None:
        special = {t: cfg.vocab_size - len(GLM_SPECIAL_TOKENS) + i for i, t in enumerate(GLM_SPECIAL_TOKENS)}
        self.cfg, self.dtype, self.chunked = cfg, dtype, chunked
        self.model = build_model(cfg, special)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        self.capture, self.meter = PreNormHidden(self.model), LoadMeter(self.model)
        self.model.train()

    def step(self, rows: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.meter.reset()
        with computing_in(self.dtype):
            losses = main_and_mtp_loss if self.chunked else autograd_losses
            main, mtp = losses(self.model, rows, self.capture)
        total = main + self.cfg.mtp_weight * mtp
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        update_bias(self.model, self.meter, self.cfg.bias_rate)
        main.item()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds after two warm-up rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(batch_size=args.batch_size, lr=3e-3)
    setups = {"float32, autograd CE": ("float32", False), "bf16, autograd CE": ("bfloat16", False), "bf16, chunked CE": ("bfloat16", True)}
    trainers = {name: Trainer(cfg, dtype, chunked) for name, (dtype, chunked) in setups.items()}
    gen, order = torch.Generator().manual_seed(0), random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in setups}
    load = os.getloadavg()[0]
    for r in range(2 + args.rounds):
        rows = torch.randint(0, cfg.vocab_size - len(GLM_SPECIAL_TOKENS), (cfg.batch_size, cfg.seq_len + 1), generator=gen)
        names = list(setups)
        order.shuffle(names)
        for name in names:
            t = trainers[name].step(rows)
            if r >= 2:
                times[name].append(t)
    base = statistics.median(times["float32, autograd CE"])
    print(f"default model's shape + MTP block, batch {cfg.batch_size} x {cfg.seq_len}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")  # fmt: skip
    print(f"{'setup':<22} {'s/step':>7} {'x float32':>10} {'1300 steps, min':>16}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22} {med:7.2f} {med / base:9.2f}x {1300 * med / 60:16.1f}")


if __name__ == "__main__":
    main()
