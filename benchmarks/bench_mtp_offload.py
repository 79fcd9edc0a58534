"""Speculative decoding with offloaded experts: what MTP drafts cost and save in expert traffic.

    python benchmarks/bench_mtp_offload.py                       # the packaged default model (it has an MTP layer)
    python benchmarks/bench_mtp_offload.py --model DIR --fractions 0.2,0.5 --new 64

The experts sit on the offload simulator (offload/device.py: modelled copies, exact byte counts) with a
device cache of as many slots as the given share of the main model's routed experts, in every row: the plain
row loads without the MTP block (what --no-mtp gives: every slot for the main experts); the MTP rows load it,
and its routed experts go through the same cache as one more MoE layer (they compete for the same slots and
their copies are in the bytes moved). Each row decodes the same chat prompts greedily (the output is token for
token the same in every row: asserted) and reports, for the decode only (counters taken after the first token):

- bytes moved host-to-device per output token (demand copies and prefetches), and of them the MTP block's own
  experts', the cache hit rate (the block's layer apart), experts prefetched and the share of them used, and
  the simulated device time per output token;
- with MTP: the acceptance length (tokens per verification), the depths chosen, and the precision/recall of
  the MTP guesses (the block's output streams put through every layer's router before each verification:
  OffloadedExperts.guess), prefetched for the layers whose guesses were at least that precise so far, or only
  scored ("no guess").

Rows: no speculation; MTP at a fixed depth with guesses taken at two precision floors and without; MTP with the depth policy choosing
(it prices the extra experts a wider verification reads with the cost model's miss price).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import localglm  # noqa: E402
import offload.backend as offload_backend  # noqa: E402
from localglm.default_model import default_model_path  # noqa: E402
from localglm.sampling import SamplingParams  # noqa: E402
from localglm.stats import GenerationStats  # noqa: E402

PROMPTS = [
    "Write a function that returns the sum of a list of numbers.",
    "How do I read a JSON file in Python?",
    "What does os.path.join do?",
    "Sort a list of dictionaries by a key.",
]


def _block_bytes(backend: Any, layer: int) -> list[int]:
    """A running total of the bytes copied into the cache for `layer`'s experts (demand and prefetch)."""
    total = [0]
    if layer not in backend.index:  # loaded without the block
        return total
    real = backend.cache.insert
    lo = backend.index[layer] * backend.n_experts

    def insert(key: int, src: torch.Tensor, *args: Any, **kw: Any) -> Any:
        slot = real(key, src, *args, **kw)
        if slot is not None and lo <= key < lo + backend.n_experts:
            total[0] += backend.codecs[layer].nbytes
        return slot

    backend.cache.insert = insert
    return total


def decode(model: localglm.Model, prompts: list[list[int]], new: int, draft: int | None, adaptive: bool) -> tuple[list[list[int]], dict[str, Any]]:
    """Greedy continuations of every prompt; the backend's counters over the decode steps only."""
    spec = model.speculation
    if spec is not None:
        spec.set_draft(draft or 0, adaptive=adaptive)
    backend = model.net.experts
    block = model.config.num_hidden_layers
    block_total = _block_bytes(backend, block)
    outs: list[list[int]] = []
    moved = tokens = hits = uses = prefetched = used = block_moved = block_hits = block_uses = 0
    sim_s = 0.0
    stats_all = GenerationStats()
    depths: dict[int, int] = {}
    for ids in prompts:
        stats = GenerationStats()
        out: list[int] = []
        start = None
        for tok in model.stream_tokens(ids, max_new_tokens=new, sampling=SamplingParams(temperature=0), reuse_prefix=False, stats=stats):
            out.append(tok)
            if start is None:
                start = (backend.counters.copy(), backend.device.elapsed_s(), block_total[0])
        assert start is not None
        d = backend.counters.minus(start[0])
        block_moved += block_total[0] - start[2]
        block_hits, block_uses = block_hits + d.layer_hits.get(block, 0), block_uses + d.layer_uses.get(block, 0)
        moved, hits, uses = moved + d.bytes_moved, hits + d.hits, uses + d.hits + d.misses
        prefetched, used = prefetched + d.prefetched, used + d.prefetch_used
        sim_s += backend.device.elapsed_s() - start[1]
        tokens += len(out) - 1
        stats_all.draft_tokens += stats.draft_tokens
        stats_all.accepted_tokens += stats.accepted_tokens
        for k, v in (stats.draft_depths or {}).items():
            depths[k] = depths.get(k, 0) + v
        outs.append(out)
    steps = sum(depths.values())
    return outs, dict(
        tokens=tokens, bytes_per_token=moved / max(1, tokens), hit_rate=hits / max(1, uses), prefetched=prefetched,
        block_bytes_per_token=block_moved / max(1, tokens), block_hit_rate=block_hits / block_uses if block_uses else None,
        prefetch_used=used / max(1, prefetched), sim_ms_per_token=1000 * sim_s / max(1, tokens),
        acceptance=(stats_all.accepted_tokens + steps) / steps if steps else None, depths=depths,
    )  # fmt: skip


def guess_scores(model: localglm.Model) -> tuple[float | None, float | None]:
    snap = model.net.experts.stats_snapshot()
    return snap.get("guess_precision"), snap.get("guess_recall")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint with an MTP layer (default: the packaged default model)")
    ap.add_argument("--fractions", default="0.2,0.5", help="shares of all routed experts the device cache holds")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--draft", type=int, default=3, help="depth of the fixed-depth rows (and the most the policy may choose)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    probe = localglm.load(path)
    if probe.speculation is None:
        print(f"{path}: no MTP layer: nothing to measure", file=sys.stderr)
        return 2
    prompts = [probe.encode_chat([{"role": "user", "content": p}]).ids for p in PROMPTS]
    n_keys = len(probe.config.moe_layers) * probe.config.n_routed_experts  # the main model's: the slots are a share of these
    del probe
    print(f"model {path}, {len(prompts)} chat prompts x {args.new} new tokens, greedy; experts on the simulated device; "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")  # fmt: skip
    print("| cached | decode | tokens | acceptance | depths | MiB moved / token | of it the MTP block's | hit rate (MTP layer's) "
          "| prefetched (used) | guess precision / recall | sim ms / token |")  # fmt: skip
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    floor = offload_backend.GUESS_MIN_PRECISION
    work = tempfile.mkdtemp(prefix="bench-mtp-offload-")
    for frac in (float(f) for f in args.fractions.split(",")):
        slots = max(1, round(frac * n_keys))
        reference = None
        rows = [("plain", None, False, floor), (f"MTP depth {args.draft}, guesses of layers >= 0.5 precise", args.draft, False, 0.5),
                (f"MTP depth {args.draft}, default (>= {floor})", args.draft, False, floor), (f"MTP depth {args.draft}, no guess", args.draft, False, 2.0),
                ("MTP auto depth, default", args.draft, True, floor)]  # fmt: skip
        for name, draft, adaptive, guess_floor in rows:
            # a fresh router profile per row: every row starts from the same (empty) statistics
            model = localglm.load(path, offload="sim", gpu_mem="64GiB", cache_slots=slots, stats_path=Path(work) / f"{frac}-{name}.npz", mtp=draft is not None)
            offload_backend.GUESS_MIN_PRECISION = guess_floor
            try:
                outs, r = decode(model, prompts, args.new, draft, adaptive)
            finally:
                offload_backend.GUESS_MIN_PRECISION = floor
            if reference is None:
                reference = outs
            assert outs == reference, f"{name}: greedy output differs from plain decoding"
            gp, gr = guess_scores(model) if draft else (None, None)
            acc = f"{r['acceptance']:.2f}" if r["acceptance"] else "-"
            depths = ", ".join(f"{k}:{v}" for k, v in sorted(r["depths"].items())) or "-"
            guess = f"{gp:.2f} / {gr:.2f}" if gp is not None and gr is not None else "-"
            block = f" ({r['block_hit_rate']:.0%})" if r["block_hit_rate"] is not None else ""
            print(f"| {frac:.0%} ({slots}) | {name} | {r['tokens']} | {acc} | {depths} | {r['bytes_per_token'] / 2**20:.3f} | "
                  f"{r['block_bytes_per_token'] / 2**20:.3f} | {r['hit_rate']:.1%}{block} | {r['prefetched']} ({r['prefetch_used']:.0%}) | {guess} | "
                  f"{r['sim_ms_per_token']:.2f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
