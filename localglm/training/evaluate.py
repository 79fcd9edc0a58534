"""Held-out perplexity, a transformers cross-check and routing traces for the default model.

    python -m localglm.training.evaluate --model localglm/data/default_model \\
        --reference DIR/checkpoint-float32 --traces benchmarks/data/default_model_traces.jsonl

Everything runs through `localglm.load` (our runtime), on the held-out stdlib files of `corpus.py`.

`--acceptance` measures the MTP draft head (a checkpoint with `num_nextn_predict_layers` 1): greedy
chat replies to held-out requests at fixed draft depths 1..N, tokens drafted and accepted, and the
acceptance length (mean tokens per verification step, the accepted drafts plus the model's own token).

Routing traces (`--traces FILE.jsonl`) are written in the offload package's format
(`offload/trace.py`: a header line, then one `{"s": step, "l": layer, "e": [[ids]]}` record per
MoE-layer call, plus `"p"` records with the next-layer predictor's guesses). Each held-out document
is decoded token by token through the KV cache (teacher-forced), so one step is one decoded token,
exactly what a decode-time expert cache sees; documents follow each other, each from position 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpus import build_corpus


def heldout_docs(tokenizer: Any, kind: str = "chat", max_tokens: int = 4096, max_doc_tokens: int = 512, corpus: Any = None) -> list[list[int]]:
    """Held-out documents as token ids (chat pairs or code files cut to `max_doc_tokens`), `max_tokens` in all."""
    corpus = corpus or build_corpus(max_code_chars=0)
    texts = corpus.heldout_chat if kind == "chat" else corpus.heldout_code
    eot = tokenizer.token_to_id("<|endoftext|>")
    docs, total = [], 0
    for text in texts:
        ids = (tokenizer.encode(text) + [eot])[:max_doc_tokens]
        if total + len(ids) > max_tokens:
            ids = ids[: max_tokens - total]
        if len(ids) < 2:
            break
        docs.append(ids)
        total += len(ids)
    return docs


def perplexity(model: Any, docs: list[list[int]]) -> float:
    """exp(mean next-token loss) of `model` (a localglm Model) over the documents, each its own sequence."""
    nll, n = 0.0, 0
    for ids in docs:
        t = torch.tensor([ids])
        logits = model.logits(t[:, :-1])[0]
        nll += torch.nn.functional.cross_entropy(logits, t[0, 1:], reduction="sum").item()
        n += len(ids) - 1
    return math.exp(nll / n)


def record_traces(model: Any, docs: list[list[int]], path: Path | None = None, predict: bool = True) -> Any:
    """Decode `docs` token by token (teacher-forced) and return the `offload.trace.Trace` (streamed to `path`)."""
    from offload.trace import attach_tracer

    rec = attach_tracer(model, path, predict=predict)
    try:
        with torch.inference_mode():
            for ids in docs:
                cache = model.net.new_cache(len(ids))
                for t, tok in enumerate(ids):
                    model.net.hidden_states(torch.tensor([[tok]], device=model.device), cache, t)
                    cache.tokens.append(tok)
    finally:
        rec.close()
        model.net.experts = model.net.experts.inner
    return rec.trace


def trace_array(trace: Any) -> np.ndarray:
    """[n_moe_layers, n_tokens, top_k] expert ids from a Trace (calls in step order)."""
    rows = {layer: [] for layer in trace.moe_layers}
    for call in trace.calls:
        rows[call.layer].append(np.asarray(call.experts))
    return np.stack([np.concatenate(rows[layer]) for layer in trace.moe_layers])


def routing_stats(experts: np.ndarray, n_experts: int, doc_starts: np.ndarray | None = None) -> list[dict[str, float]]:
    """Per MoE layer: expert-use entropy (bits, and / log2 E), share of the top 25% experts, consecutive reuse.

    `reuse` is the mean fraction of token t's experts that token t-1 also used (document starts
    skipped); `reuse_random` is what independent uniform routing would give (k / E).
    """
    out = []
    k = experts.shape[-1]
    follow = np.ones(experts.shape[1], dtype=bool)
    follow[0] = False
    if doc_starts is not None:
        follow[doc_starts] = False
    for row in experts:
        counts = np.bincount(row.reshape(-1), minlength=n_experts).astype(np.float64)
        p = counts / counts.sum()
        nz = p[p > 0]
        entropy = float(-(nz * np.log2(nz)).sum())
        top = np.sort(counts)[::-1][: max(1, n_experts // 4)].sum() / counts.sum()
        prev = row[:-1][follow[1:]]
        cur = row[1:][follow[1:]]
        shared = (cur[:, :, None] == prev[:, None, :]).any(-1).sum(-1) / k
        out.append({
            "entropy_bits": entropy, "entropy_norm": entropy / math.log2(n_experts), "top25_share": float(top),
            "reuse": float(shared.mean()), "reuse_random": k / n_experts,
            "max_over_mean_load": float(counts.max() / counts.mean()),
        })  # fmt: skip
    return out


def acceptance(model: Any, requests: list[str], depths: list[int], max_new_tokens: int = 96) -> dict[int, dict[str, float]]:
    """Greedy chat replies to `requests` drafting exactly d tokens a step (d in `depths`, no adaptive
    choice): drafted, accepted, accepted / drafted and acceptance length over all the replies."""
    from ..engine import Done

    spec = model.speculation
    if spec is None:
        raise ValueError(f"{model.path}: no MTP head to measure (num_nextn_predict_layers 0, or its tensors are missing)")
    out = {}
    for d in depths:
        spec.set_draft(d, adaptive=False)
        drafted = accepted = steps = tokens = 0
        for req in requests:
            done = [e for e in model.generate(messages=[{"role": "user", "content": req}], max_new_tokens=max_new_tokens, temperature=0)
                    if isinstance(e, Done)][-1]  # fmt: skip
            st = done.stats
            drafted, accepted, tokens = drafted + st.draft_tokens, accepted + st.accepted_tokens, tokens + len(done.token_ids)
            steps += sum(st.draft_depths.values())
        out[d] = {"draft_tokens": drafted, "accepted_tokens": accepted, "accept_rate": accepted / max(1, drafted),
                  "acceptance_length": (accepted + steps) / max(1, steps), "steps": steps, "tokens": tokens}  # fmt: skip
    return out


def compare_with_transformers(path: Path, ids: torch.Tensor) -> float:
    """Max |logit difference| / max |logit| between localglm and transformers on a float32 checkpoint."""
    import transformers

    import localglm

    ours = localglm.load(path, dtype="float32").logits(ids)
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits.float()
    return float((ours - ref).abs().max() / ref.abs().max())


def main(argv: list[str] | None = None) -> int:
    import localglm

    ap = argparse.ArgumentParser(prog="python -m localglm.training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the packaged (fp8) checkpoint")
    ap.add_argument("--reference", type=Path, default=None, help="the float32 checkpoint the training run wrote (work/checkpoint-float32)")
    ap.add_argument("--traces", type=Path, default=None, help="write routing traces here (offload/trace.py JSONL format)")
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens per measurement (default 4096)")
    ap.add_argument("--trace-tokens", type=int, default=1536, help="held-out tokens of each kind (chat, code) to trace (default 1536)")
    ap.add_argument("--acceptance", type=int, default=0, metavar="N",
                    help="also measure the MTP head: greedy replies to held-out requests at draft depths 1..N")
    ap.add_argument("--acceptance-requests", type=int, default=8, help="held-out requests for --acceptance (default 8)")
    ap.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="with --acceptance: the drafter scores the N most frequent tokens (default: load's, 2048 where "
                    "the checkpoint ships draft_vocab.json; 0: the whole head)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    model = localglm.load(args.model)
    corpus = build_corpus(max_code_chars=0)
    chat = heldout_docs(model.tokenizer, "chat", args.tokens, corpus=corpus)
    code = heldout_docs(model.tokenizer, "code", args.tokens, corpus=corpus)
    results["heldout_tokens"] = {"chat": sum(map(len, chat)), "code": sum(map(len, code))}
    results["ppl"] = {f"packaged ({model.dtype})": {"chat": perplexity(model, chat), "code": perplexity(model, code)}}
    if args.reference:
        for dt in ("float32", "bfloat16"):
            ref = localglm.load(args.reference, dtype=dt)
            results["ppl"][f"reference {dt}"] = {"chat": perplexity(ref, chat), "code": perplexity(ref, code)}
        f32 = localglm.load(args.model, dtype="float32")
        results["ppl"]["packaged fp8 weights, float32 compute"] = {"chat": perplexity(f32, chat), "code": perplexity(f32, code)}
        ids = torch.tensor([chat[0][:64], chat[1][:64]]) if min(len(chat[0]), len(chat[1])) >= 64 else torch.tensor([chat[0][:16]])
        results["transformers_rel_max_err"] = compare_with_transformers(args.reference, ids)
    if args.acceptance:
        mtp_model = localglm.load(args.model, mtp=True, draft_vocab=args.draft_vocab)
        requests = [e.request for e in corpus.heldout_examples[: args.acceptance_requests]]
        results["mtp_acceptance"] = acceptance(mtp_model, requests, list(range(1, args.acceptance + 1)))
    print(json.dumps(results, indent=2), flush=True)
    if args.traces:
        n = args.trace_tokens
        docs = heldout_docs(model.tokenizer, "chat", n, corpus=corpus) + heldout_docs(model.tokenizer, "code", n, 256, corpus=corpus)
        args.traces.parent.mkdir(parents=True, exist_ok=True)
        trace = record_traces(model, docs, args.traces)
        arr = trace_array(trace)
        starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
        stats = routing_stats(arr, model.config.n_routed_experts, starts)
        results["routing"] = {int(layer): s for layer, s in zip(trace.moe_layers, stats)}
        print(f"traces: {arr.shape[1]} tokens x {arr.shape[0]} MoE layers -> {args.traces} ({args.traces.stat().st_size} bytes)")
        print("| layer | entropy bits (/log2 E) | top-25% share | consecutive reuse (random) | max/mean load |")
        print("|---:|---:|---:|---:|---:|")
        for layer, s in results["routing"].items():
            print(f"| {layer} | {s['entropy_bits']:.2f} ({s['entropy_norm']:.2f}) | {s['top25_share']:.2f} | "
                  f"{s['reuse']:.2f} ({s['reuse_random']:.2f}) | {s['max_over_mean_load']:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
