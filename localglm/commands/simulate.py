"""`localglm simulate TRACE` and `localglm record-trace MODEL`: routing traces and the cache simulator."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import LocalGLMError
from .flags import MODEL_HELP

DEFAULT_FRACTIONS = "0.1,0.2,0.3,0.4,0.5"


def _fractions(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LocalGLMError(f"--sizes: expected comma-separated fractions like {DEFAULT_FRACTIONS}, got {text!r}") from None
    bad = [v for v in vals if not 0 < v <= 1]
    if not vals or bad:
        raise LocalGLMError(f"--sizes: each cache size is a fraction of all experts in (0, 1], got {text!r}")
    return vals


def cmd_simulate(args: argparse.Namespace) -> int:
    from offload.policies import POLICY_NAMES
    from offload.router_stats import RouterStats
    from offload.simulator import compare, format_table
    from offload.trace import Trace

    if not (math.isfinite(args.half_life) and args.half_life > 0):  # LFU's decay rate is log(2) / half-life
        raise LocalGLMError(f"--half-life {args.half_life:g}: must be a positive number of tokens")
    trace = Trace.load(args.trace)
    fractions = _fractions(args.sizes)
    policies = [p.strip().lower() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise LocalGLMError(f"--policies: unknown {', '.join(unknown)} (choose from {', '.join(POLICY_NAMES)})")
    rates, rate_tokens = None, 0.0
    if args.stats:
        st = RouterStats.load(args.stats)
        if st.moe_layers != trace.moe_layers or st.n_experts != trace.n_experts:
            raise LocalGLMError(f"{args.stats}: router statistics are for a different model shape than {args.trace}")
        rates, rate_tokens = st.rates(), float(st.tokens)
    has_pred = any(c.predicted is not None for c in trace.calls)
    if args.prefetch and not has_pred:
        raise LocalGLMError(f"{args.trace}: --prefetch needs predictions in the trace (record with prediction on)")
    if args.step_oracle:
        if args.prefetch:
            raise LocalGLMError("--step-oracle is a demand-paging bound: run it without --prefetch")
        policies.append("step-oracle")
    rows = compare(trace, fractions, policies, prefetch=args.prefetch, rates=rates, rate_tokens=rate_tokens, half_life=args.half_life)
    if args.json:
        out = [{"fraction": r["fraction"], "capacity": r["capacity"], **{p: r[p].to_dict() for p in policies + ["belady"]}} for r in rows]
        print(json.dumps({"trace": str(args.trace), "calls": len(trace.calls), "tokens": trace.tokens, "rows": out}))
        return 0
    print(
        f"trace {args.trace}: {len(trace.calls)} MoE calls, {trace.tokens} tokens, {len(trace.moe_layers)} MoE layers x "
        f"{trace.n_experts} experts (top-{trace.top_k}), {trace.n_keys} experts in all"
    )
    print(format_table(rows, policies, trace.expert_bytes))
    if has_pred:
        r = rows[0][policies[0]] if policies else rows[0]["belady"]
        print(f"next-layer prediction (recorded): precision {100 * r.precision:.1f}%, recall {100 * r.recall:.1f}%")
    if args.prefetch:
        print("policies ran with prefetch of the recorded predictions; Belady is demand paging without prefetch")
    return 0


def cmd_record_trace(args: argparse.Namespace) -> int:
    from offload.trace import attach_tracer, check_trace_target

    from ..checkpoint.writing import writing
    from ..cli import device_for, load_options, sampling_overrides
    from ..loader import load
    from .flags import set_threads

    if args.prompt is None and args.prompt_file is None:
        raise LocalGLMError("record-trace: give a prompt with -p TEXT or --prompt-file PATH")
    if args.trace:
        raise LocalGLMError("record-trace writes its trace to -o/--out; --trace is for the other commands")
    try:
        prompt = args.prompt if args.prompt is not None else Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalGLMError(f"--prompt-file {args.prompt_file}: cannot read it as UTF-8 text ({getattr(exc, 'strerror', None) or exc})") from None
    out = check_trace_target(args.out)
    existed = out.exists()
    with writing(out):  # a read-only or missing directory fails here, not after the model has loaded
        open(out, "a").close()
    if not existed:
        out.unlink()
    set_threads(args.threads)
    sampling = sampling_overrides(args)
    opts: dict[str, Any] = load_options(args)
    if args.offload:
        opts["trace"] = args.out  # the offloading backend records, its predictions included
    model = load(args.model, device=device_for(args), dtype=args.dtype, ctx=args.ctx, **opts)
    rec = model.net.experts.recorder if args.offload else attach_tracer(model, args.out, predict=not args.no_predict)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True, **sampling)
    text = model.generate_text(prompt, **kwargs)
    rec.close()
    tr = rec.trace
    print(f"wrote {args.out}: {len(tr.calls)} MoE calls over {rec.step + 1} steps ({len(text)} chars generated)", file=sys.stderr)
    stats = model.last_stats
    if stats is not None:
        print(stats.summary_line(), file=sys.stderr)
        b = stats.backend
        if b.get("offload"):
            print(
                f"offload ({b['offload']}, {b['policy']}, {b['cache_slots']} slots of {b['experts_total']}): hit rate {100 * b['hit_rate']:.1f}%, "
                f"{b['copied']} copied / {b['cpu_computed']} on CPU, {b['bytes_per_token'] / 1e6:.2f} MB/token moved, "
                f"prefetch precision {100 * (b['prefetch_precision'] or 0):.1f}% recall {100 * (b['prefetch_recall'] or 0):.1f}%",
                file=sys.stderr,
            )
    return 0


def register(sub: Any) -> None:
    from offload.policies import HALF_LIFE

    from ..cli import add_engine_options, add_sampling_options

    s = sub.add_parser(
        "simulate",
        help="replay a routing trace against expert-cache sizes and policies, beside Belady's optimum",
        description="Hit rate and bytes moved for each cache policy at each cache size (a fraction of all routed experts).",
    )
    s.add_argument("trace", help="routing trace (.jsonl) from `localglm record-trace` or load(trace=PATH)")
    s.add_argument("--sizes", default=DEFAULT_FRACTIONS, help=f"cache sizes as fractions of all experts (default {DEFAULT_FRACTIONS})")
    s.add_argument("--policies", default="lru,lfu,stat", help="comma-separated: lru, lfu (with decay), stat (router statistics)")
    s.add_argument("--stats", default=None, help="router statistics profile (.npz) to seed the stat policy")
    s.add_argument("--half-life", type=float, default=HALF_LIFE, help=f"LFU decay half-life in tokens (default {HALF_LIFE:g})")
    s.add_argument("--prefetch", action="store_true", help="prefetch the predictions recorded in the trace")
    s.add_argument(
        "--step-oracle", action="store_true",
        help="also replay a bound: LFU that knows the rest of each token's routing (what predicting this token's "
        "later layers could give a demand policy at most; it cannot know the next token's, as Belady does)",
    )  # fmt: skip
    s.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("record-trace", help="generate and record every MoE layer's routing to a trace file")
    r.add_argument("model", help=MODEL_HELP)
    r.add_argument("-o", "--out", required=True, help="trace file to write (.jsonl)")
    r.add_argument("-p", "--prompt", default=None, help="prompt text")
    r.add_argument("--prompt-file", default=None, help="read the prompt from a file")
    r.add_argument("-n", "--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    r.add_argument("--no-predict", action="store_true", help="do not record next-layer predictions")
    r.add_argument("-q", "--quiet", action="store_true", help="(accepted for symmetry with generate; loading shows no bar here)")
    add_sampling_options(r)
    add_engine_options(r)
    r.set_defaults(func=cmd_record_trace)
