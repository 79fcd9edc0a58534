"""Routing locality of GLM-5-shaped routing against the trained default model (issue 14, item 5).

GLM-5.x routing is reported near flat (237 of 256 experts used per layer within 75 tokens), so an expert
cache alone should help less than on GLM-4.x. For each model this records a routing trace of greedy
decoding (a profile run on one prompt seeds the router statistics, an eval run on another is traced),
then reports (decoding samples at temperature 0.8, seeded):

- spread: distinct experts per MoE layer within the first 75 decoded tokens (mean over layers);
- prediction: precision and recall of the existing predictor one MoE layer ahead (the guesses the
  prefetcher acts on), as recorded during the run;
- caching: the cache simulator's hit rate at 10/20/30% of experts on the device, LRU on demand and
  the `stat` policy with prefetch, beside Belady's optimum;
- the CPU path: the offloaded backend on the simulated device with the cost model's miss policy at
  20% of experts: the share of routed-expert calls served from the cache, copied in, and run on the CPU.

Models: the packaged default model (trained; 4 MoE layers of 16 experts top-4) and a random GLM-5-shaped
one (glm_moe_dsa: 256 routed experts top-8, sigmoid routing with a correction bias, 6 layers, small widths
so that it runs in seconds; written on first use). A random router has no preferences learned from text,
so its spread is the flat end of the scale; the trained model is the other end.

    python benchmarks/bench_routing_locality.py
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import localglm  # noqa: E402
from bench_offload import recall_by_layer, stats_from_trace  # noqa: E402
from localglm.default_model import default_model_path  # noqa: E402
from offload.simulator import compare  # noqa: E402
from offload.trace import Trace, attach_tracer  # noqa: E402

FRACTIONS = [0.1, 0.2, 0.3]
SPREAD_TOKENS = 75
# Sampled as a chat would (greedy decoding of a random model falls into loops that flatter locality).
SAMPLING = localglm.SamplingParams(temperature=0.8, seed=1)


def glm5_shaped(root: Path) -> Path:
    """A random glm_moe_dsa checkpoint with GLM-5's expert count and top-k (256, 8)."""
    from localglm.models.glm_moe_dsa.tiny import TinySpec
    from localglm.tiny import make_tiny

    path = root / "glm5-routing-256x8"
    if not (path / "config.json").is_file():
        spec = TinySpec(
            hidden_size=256, intermediate_size=512, num_hidden_layers=6, moe_intermediate_size=32, n_routed_experts=256,
            num_experts_per_tok=8, first_k_dense_replace=1, index_topk=64, seed=7,
        )  # fmt: skip
        make_tiny(path, spec)
    return path


def prompts(model: Any, n: int) -> tuple[list[int], list[int]]:
    """Two different prompts of about n tokens: stdlib source text where the model has a tokenizer."""
    if model.tokenizer is not None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        a = model.tokenizer.encode((stdlib / "random.py").read_text()[:4000])[:n]
        b = model.tokenizer.encode((stdlib / "collections" / "__init__.py").read_text()[2000:6000])[:n]
        return a, b
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (n,), generator=g).tolist(), torch.randint(0, vocab, (n,), generator=g).tolist()


def decode_trace(path: Path, prompt: list[int], tokens: int, out: Path, **load: Any) -> Trace:
    model = localglm.load(path, **load)
    rec = attach_tracer(model, out)
    list(model.stream_tokens(prompt, max_new_tokens=tokens, sampling=SAMPLING))
    rec.close()
    return rec.trace


def spread(trace: Trace, tokens: int) -> float:
    """Mean over MoE layers of the distinct experts the first `tokens` decoded tokens used."""
    decode = [c for c in trace.calls if len(c.experts) == 1]
    per_layer: dict[int, set[int]] = {}
    counts: dict[int, int] = {}
    for c in decode:
        if counts.get(c.layer, 0) < tokens:
            per_layer.setdefault(c.layer, set()).update(c.experts.reshape(-1).tolist())
            counts[c.layer] = counts.get(c.layer, 0) + 1
    return sum(len(s) for s in per_layer.values()) / max(1, len(per_layer))


def precision_recall(trace: Trace) -> tuple[float, float]:
    """Pooled over decode calls after the first MoE layer (whose guess has no layer before it)."""
    decode = [c for c in trace.calls if len(c.experts) == 1 and c.layer != trace.moe_layers[0] and c.predicted is not None]
    hit = guessed = used = 0
    for c in decode:
        actual, guess = set(c.experts.reshape(-1).tolist()), set(c.predicted.tolist())
        hit, guessed, used = hit + len(actual & guess), guessed + len(guess), used + len(actual)
    assert recall_by_layer(decode, pooled=True) == (hit / used if used else 0.0)
    return (hit / guessed if guessed else 0.0), (hit / used if used else 0.0)


def cpu_path_share(path: Path, prompt: list[int], tokens: int, slots: int, stats: Path) -> dict[str, float]:
    """The offloaded backend on the simulated device, cost-model misses: where routed-expert calls ran."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = localglm.load(path, offload="sim", gpu_mem="4GiB", cache_slots=slots, stats_path=stats, miss="cost")
    be = model.net.experts
    list(model.stream_tokens(prompt, max_new_tokens=tokens, sampling=SAMPLING))
    c = be.counters
    total = max(1, c.hits + c.copied + c.cpu_computed)
    return {"cached": c.hits / total, "copied": c.copied / total, "cpu": c.cpu_computed / total}


def measure(name: str, path: Path, work: Path, tokens: int) -> dict[str, Any]:
    model = localglm.load(path)
    a, b = prompts(model, 64)
    profile = decode_trace(path, a, tokens, work / f"{name}-profile.jsonl")
    stats = stats_from_trace(profile)
    stats_path = work / f"{name}-stats.npz"
    stats.save(stats_path)
    trace = decode_trace(path, b, tokens, work / f"{name}-eval.jsonl", stats_path=stats_path)
    decode = Trace(trace.n_experts, trace.top_k, trace.moe_layers, trace.expert_bytes, trace.model, [c for c in trace.calls if len(c.experts) == 1])
    demand = compare(decode, FRACTIONS, ["lru"], prefetch=False)
    prefetch = compare(decode, FRACTIONS, ["stat"], prefetch=True, rates=stats.rates(), rate_tokens=stats.tokens)
    precision, recall = precision_recall(trace)
    slots = int(0.2 * len(trace.moe_layers) * trace.n_experts)
    return {
        "model": name, "experts": trace.n_experts, "top_k": trace.top_k, "moe_layers": len(trace.moe_layers),
        "spread": spread(trace, SPREAD_TOKENS), "precision": precision, "recall": recall,
        "lru": [r["lru"].hit_rate for r in demand], "stat_prefetch": [r["stat"].hit_rate for r in prefetch],
        "belady": [r["belady"].hit_rate for r in demand],
        "cpu_path": cpu_path_share(path, b, tokens, slots, stats_path),
    }  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    pct = lambda xs: " / ".join(f"{100 * x:.0f}%" for x in xs)  # noqa: E731
    out = [
        f"| model | experts (top-k) | distinct per layer in {SPREAD_TOKENS} tokens | prediction 1 layer ahead: precision / recall "
        "| hit rate at 10/20/30% cached: LRU | stat + prefetch | Belady | at 20%, cost model: cached / copied / CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cp = r["cpu_path"]
        out.append(
            f"| {r['model']} | {r['experts']} ({r['top_k']}) | {r['spread']:.0f} of {r['experts']} ({100 * r['spread'] / r['experts']:.0f}%) "
            f"| {100 * r['precision']:.0f}% / {100 * r['recall']:.0f}% | {pct(r['lru'])} | {pct(r['stat_prefetch'])} | {pct(r['belady'])} "
            f"| {100 * cp['cached']:.0f}% / {100 * cp['copied']:.0f}% / {100 * cp['cpu']:.0f}% |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=150, help="decoded tokens per run")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "localglm-routing", help="traces and the random model")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [
        measure("default model (trained, glm4_moe)", default_model_path(), args.work, args.tokens),
        measure("GLM-5-shaped, random (glm_moe_dsa)", glm5_shaped(args.work), args.work, args.tokens),
    ]
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
