"""Offload benchmark on the CPU: routing traces from a (trained) model, the cache simulator at cache
sizes of 10-50% of experts beside Belady's optimum, and next-layer prediction precision/recall.

    python benchmarks/train_tiny_moe.py /tmp/tinytrained          # a tiny model whose routers learned
    python benchmarks/bench_offload.py /tmp/tinytrained --out /tmp/bench_offload

Two runs: a profile run (prompt A) whose router statistics seed the `stat` policy, and an eval run
(prompt B, different text) that is recorded and replayed. Prediction variants are scored side by side.

Synthetic decode of the expert path alone (OffloadedExperts on a SimulatedDevice or real CUDA), with
random blobs and skewed random routing, against the bound the measured bandwidths imply:

    python benchmarks/bench_offload.py --synthetic --device sim --layers 4 --experts 16 --hidden 256 --inter 128
    python benchmarks/bench_offload.py --synthetic --device cuda --gpu-mem 10GiB   # GLM-4.5-Air experts, 4-bit
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from localglm.loader import load  # noqa: E402
from offload.prefetch import predictor_for  # noqa: E402
from offload.router_stats import RouterStats  # noqa: E402
from offload.simulator import compare, format_table  # noqa: E402
from offload.trace import attach_tracer  # noqa: E402


class ScoredVariants:
    """Wraps the traced backend's hint and forward to score extra predictors on the same hidden states."""

    def __init__(self, backend, variants: dict) -> None:
        self.variants = variants
        self._hint, self._forward, self._attended = backend.hint, backend.forward, backend.attended
        backend.hint, backend.forward, backend.attended = self.hint, self.forward, self.attended

    def hint(self, layer, x):
        for p in self.variants.values():
            p.expect(p.predict(layer, x), layer)
        return self._hint(layer, x)

    def attended(self, layer, x):
        for p in self.variants.values():
            p.attended(layer, x)
        return self._attended(layer, x)

    def forward(self, layer, x, ids, w):
        for p in self.variants.values():
            p.observe(layer, ids)
        return self._forward(layer, x, ids, w)


def recall_by_layer(calls, pooled: bool = False):
    """Recall of the predictions recorded with each call: per layer, or pooled over the calls."""
    hit: dict[int, int] = {}
    used: dict[int, int] = {}
    for c in calls:
        if c.predicted is None:
            continue
        actual = set(c.experts.reshape(-1).tolist())
        hit[c.layer] = hit.get(c.layer, 0) + len(actual & set(c.predicted.tolist()))
        used[c.layer] = used.get(c.layer, 0) + len(actual)
    if pooled:
        return sum(hit.values()) / max(1, sum(used.values()))
    return {layer: hit[layer] / used[layer] for layer in sorted(used) if used[layer]}


def stats_from_trace(trace) -> RouterStats:
    st = RouterStats(trace.moe_layers, trace.n_experts, trace.top_k)
    for c in trace.calls:
        st.update(c.layer, c.experts)
    return st


def synthetic(args: argparse.Namespace) -> dict:
    import math

    import torch

    from offload.backend import OffloadedExperts
    from offload.cost_model import measure_bandwidths
    from offload.device import CudaDevice, SimulatedDevice
    from offload.expert_cache import Bf16Codec, QuantCodec
    from offload.planner import parse_size

    L, E, k, H, inter = args.layers, args.experts, args.top_k, args.hidden, args.inter
    bw = measure_bandwidths(args.device)
    budget = parse_size(args.gpu_mem)
    dev = SimulatedDevice(budget, bw) if args.device == "sim" else CudaDevice(budget, bandwidths=bw)
    xdev = dev.torch_device
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    if args.bits == 16:
        codec = Bf16Codec(H, inter, dtype)
        one = torch.empty(codec.nbytes, dtype=torch.uint8)
        codec.pack((torch.randn(2 * inter, H, generator=g) / math.sqrt(H)).to(dtype), (torch.randn(H, inter, generator=g) / math.sqrt(inter)).to(dtype), one)
    else:
        from quant.blob import ExpertBlobLayout, quantize_expert
        from quant.formats import QuantSpec

        spec = QuantSpec.for_bits(args.bits)
        codec = QuantCodec(ExpertBlobLayout(H, inter, spec, spec), dtype)
        one = quantize_expert(codec.layout, torch.randn(inter, H, generator=g) / math.sqrt(H), torch.randn(inter, H, generator=g) / math.sqrt(H), torch.randn(H, inter, generator=g) / math.sqrt(inter))
    host = {}
    for layer in range(L):  # random weights: one blob per layer, replicated (content does not matter for speed)
        buf = dev.host_buffer(E * codec.nbytes).view(E, codec.nbytes)
        buf.copy_(one.expand(E, -1))
        host[layer] = buf
    slots = min(L * E, (dev.budget.capacity - dev.budget.used) // codec.nbytes)
    be = OffloadedExperts(list(range(L)), E, k, codec, host, dev, slots, policy=args.policy, miss=args.miss, flops_per_token=6 * H * inter, preload=False)
    # Routing: Zipf-skewed popularity per layer; with probability `locality` a token keeps an expert of the previous token.
    rng = torch.Generator().manual_seed(1)
    pop = torch.arange(1, E + 1, dtype=torch.float) ** -args.zipf
    perms = [torch.randperm(E, generator=rng) for _ in range(L)]
    prev: dict[int, torch.Tensor] = {}

    def route(layer: int) -> torch.Tensor:
        ids = perms[layer][torch.multinomial(pop, k, generator=rng)]
        if layer in prev:
            keep = torch.rand(k, generator=rng) < args.locality
            ids = torch.where(keep, prev[layer], ids)
            ids = torch.unique(ids)
            while len(ids) < k:
                ids = torch.unique(torch.cat([ids, perms[layer][torch.multinomial(pop, 1, generator=rng)]]))
        prev[layer] = ids
        return ids.view(1, k)

    x = torch.randn(1, H, dtype=dtype, device=xdev)
    w = torch.full((1, k), 1.0 / k, device=xdev)

    def step() -> None:
        nonlocal x
        for layer in range(L):
            y = be.forward(layer, x, route(layer).to(xdev), w)
            x = (x + y) / (x + y).float().norm().clamp(min=1e-3).to(dtype) * math.sqrt(H)

    for _ in range(args.warmup):
        step()
    dev.synchronize()
    c0 = be.counters.copy()
    sim0 = dev.elapsed_s()
    t0 = time.perf_counter()
    for _ in range(args.tokens):
        step()
    dev.synchronize()
    wall = time.perf_counter() - t0
    d = be.counters.minus(c0)
    n = args.tokens
    sim = dev.elapsed_s() - sim0
    cm = be.cost
    # The bound these bandwidths imply at this hit rate: copies and compute overlap perfectly, so a
    # token takes the longer of its transfers and its expert compute (device and CPU).
    transfer_s = d.bytes_moved / n / bw.h2d
    compute_s = ((d.hits + d.copied) * cm.gpu_s(1) + d.cpu_computed * cm.cpu_s(1)) / n
    bound_s = max(transfer_s, compute_s)
    took = sim if args.device == "sim" else wall
    res = {
        "device": args.device, "shape": dict(layers=L, experts=E, top_k=k, hidden=H, inter=inter, bits=args.bits),
        "expert_bytes": codec.nbytes, "slots": slots, "slot_share": slots / (L * E), "policy": args.policy,
        "hit_rate": d.hit_rate, "bytes_per_token": d.bytes_moved / n, "copied_per_token": d.copied / n,
        "cpu_per_token": d.cpu_computed / n, "stall_s_per_token": d.stall_s / n,
        "tok_s": n / took, "wall_tok_s": n / wall, "bound_tok_s": 1 / bound_s if bound_s else 0.0,
        "measured": {f: getattr(bw, f) for f in bw.measured},
    }  # fmt: skip
    res["share_of_bound"] = res["tok_s"] / res["bound_tok_s"] if res["bound_tok_s"] else 0.0
    print(json.dumps(res, indent=1))
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--synthetic", action="store_true", help="time the expert path on random blobs (no model needed)")
    ap.add_argument("--device", default="sim", choices=("sim", "cuda"))
    ap.add_argument("--gpu-mem", default="10GiB", help="device budget for the expert cache")
    ap.add_argument("--layers", type=int, default=45)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4, 8, 16))
    ap.add_argument("--policy", default="stat")
    ap.add_argument("--miss", default="cost", choices=("cost", "copy", "cpu"))
    ap.add_argument("--zipf", type=float, default=0.8)
    ap.add_argument("--locality", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="/tmp/bench_offload")
    ap.add_argument("--profile-tokens", type=int, default=150)
    ap.add_argument("--eval-tokens", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.synthetic:
        synthetic(args)
        return 0
    if not args.model:
        ap.error("give MODEL (or --synthetic)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompt_a = (stdlib / "random.py").read_text()[:1500]
    prompt_b = (stdlib / "collections" / "__init__.py").read_text()[2000:3500]
    results: dict = {"model": args.model, "profile_tokens": args.profile_tokens, "eval_tokens": args.eval_tokens}

    t0 = time.time()
    model = load(args.model)
    rec = attach_tracer(model, out / "trace_profile.jsonl")
    model.generate_text(prompt_a, max_new_tokens=args.profile_tokens, temperature=0.7, seed=1, ignore_eos=True)
    rec.close()
    profile = stats_from_trace(rec.trace)
    profile.save(out / "profile.npz")
    print(f"profile run: {rec.trace.tokens} tokens in {time.time() - t0:.0f}s", flush=True)

    model = load(args.model)
    net = model.net
    rec = attach_tracer(model, out / "trace_eval.jsonl")  # records the default predictor's guesses
    variants = {  # name -> (predictor, which of its counts)
        "next layer, its input only (k)": (predictor_for(net, stat_weight=0.0, depth=1, carry_attention=False), 1),
        "next layer + last token's attention (k)": (predictor_for(net, stat_weight=0.0, depth=1), 1),
        "next layer + attention + co-occurrence stats (k, default)": (predictor_for(net, profile), 1),
        "next layer, k+2": (predictor_for(net, extra=2, depth=1, stat_weight=0.0), 1),
        "next layer, k+4": (predictor_for(net, extra=4, depth=1, stat_weight=0.0), 1),
        "two layers ahead (k)": (predictor_for(net, depth=2, stat_weight=0.0), 2),
    }
    ScoredVariants(net.experts, {name: p for name, (p, _) in variants.items()})
    t0 = time.time()
    model.generate_text(prompt_b, max_new_tokens=args.eval_tokens, temperature=0.7, seed=2, ignore_eos=True)
    rec.close()
    trace = rec.trace
    print(f"eval run: {trace.tokens} tokens in {time.time() - t0:.0f}s", flush=True)
    results.update(trace_tokens=trace.tokens, n_experts=trace.n_experts, top_k=trace.top_k, moe_layers=len(trace.moe_layers), expert_bytes=trace.expert_bytes)
    decode_only = [c for c in trace.calls if len(c.experts) == 1]
    results["prediction"] = {}
    for name, (p, ahead) in variants.items():
        c = p.counts_ahead[ahead]
        results["prediction"][name] = {"precision": c.precision, "recall": c.recall}
        print(f"prediction {name:<46} precision {100 * c.precision:5.1f}%  recall {100 * c.recall:5.1f}%")
    per_layer = recall_by_layer(decode_only)
    results["prediction_recall_by_layer"] = per_layer
    later = [c for c in decode_only if c.layer != trace.moe_layers[0]]
    results["prediction_recall_after_first_moe_layer"] = recall_by_layer(later, pooled=True)
    print("recorded predictions (default predictor), decode recall by MoE layer: "
          + "  ".join(f"{layer}: {100 * r:.1f}%" for layer, r in per_layer.items())
          + f"; MoE layer to MoE layer (all but the first): {100 * results['prediction_recall_after_first_moe_layer']:.1f}%")

    fractions = [0.1, 0.2, 0.3, 0.4, 0.5]
    policies = ["lru", "lfu", "stat"]
    from offload.trace import Trace

    for label, tr in (("all (prefill + decode)", trace), ("decode only", Trace(trace.n_experts, trace.top_k, trace.moe_layers, trace.expert_bytes, trace.model, decode_only))):
        for prefetch in (False, True):
            pols = policies if prefetch else policies + ["step-oracle"]
            rows = compare(tr, fractions, pols, prefetch=prefetch, rates=profile.rates(), rate_tokens=profile.tokens)
            key = f"{label}, {'prefetch' if prefetch else 'demand'}"
            print(f"\n== {key}")
            print(format_table(rows, pols, tr.expert_bytes))
            results[key] = [
                {"fraction": r["fraction"], "capacity": r["capacity"], **{p: {"hit_rate": r[p].hit_rate, "bytes": r[p].bytes_moved} for p in pols + ["belady"]}}
                for r in rows
            ]
    for hl in (8, 32, 128, 512):
        rows = compare(trace, fractions, ["lfu"], half_life=hl)
        print(f"lfu half-life {hl:4d}: " + "  ".join(f"{100 * r['lfu'].hit_rate:5.1f}%" for r in rows))
        results.setdefault("lfu_half_life", {})[str(hl)] = [r["lfu"].hit_rate for r in rows]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
