"""Time to first token of an agent's next turn when another conversation took a turn in between,
with the prompts set aside in RAM (`serve --cache-ram`, the default) and without (`--cache-ram 0`),
beside llama-cpp-python's own prompt cache (`LlamaRAMCache`) on the same token ids.

Coding agents interleave conversations: Claude Code asks a small side question (a title, a topic
check) beside the user's turns, and runs subagents; the engine has one live KV cache. Scenario,
through a real `localglm serve` on a loopback port (the model's output is forced, so both runs do the
same work apart from what the prompt cache saves):

  1. conversation A, turn 1 (a long coding-agent history; the model answers with a tool call);
  2. conversation B, a short side request with its own system prompt;
  3. conversation A, turn 2 (turn 1 + the tool call + its result): timed.

    python benchmarks/bench_prompt_cache.py                   # ~4k-token conversation, 3 reps
    python benchmarks/bench_prompt_cache.py --tokens 8000 --threads 2

llama.cpp (the optional llama-cpp-python) runs a GGUF of the same weights (`localglm export-gguf`) on
the three prompts' token ids, one token each, with and without `Llama.set_cache(LlamaRAMCache())`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_prefix_reuse import TOOLS, bench_spec, conversation, run

import localglm
from localglm.server import ServerSettings
from localglm.tiny import make_tiny

SIDE = [
    {"role": "system", "content": "Give the conversation a title of at most six words."},
    {"role": "user", "content": "Find out why the text wrapping tests fail and fix it. SCRIPT:side"},
]


def turn_one(msgs: list[dict], rep: int) -> list[dict]:
    """Turn 1 of A as bench_prefix_reuse.run sends it."""
    return msgs + [{"role": "user", "content": f"Run the tests, attempt {rep}. SCRIPT:turn1"}]


def run_ours(model: localglm.Model, msgs: list[dict], cache_ram: int | None, reps: int) -> dict:
    res = run(model, msgs, ServerSettings(model_name="bench", cache_ram_bytes=cache_ram), reps, side=SIDE)
    store = model.prompt_cache
    return {**res, "ttft": res["client_ttft"], "engine": res["engine_ttft"], "ram": store.nbytes if store is not None else 0}


def token_ids(model: localglm.Model, msgs: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """The three prompts as token ids (turn 2 carries turn 1's forced reply), for llama.cpp."""
    turn1 = turn_one(msgs, 0)
    tc = {"id": "call_x", "type": "function", "function": {"name": "run_tests", "arguments": '{"pattern": "test_textwrap"}'}}
    turn2 = turn1 + [{"role": "assistant", "content": "I will run the tests.", "tool_calls": [tc]},
                     {"role": "tool", "tool_call_id": "call_x", "content": "42 passed in 0.8s"}]  # fmt: skip
    enc = model.tokenizer.encode
    return enc(model.render_chat(turn1, tools=TOOLS)), enc(model.render_chat(SIDE)), enc(model.render_chat(turn2, tools=TOOLS))


def run_llama(gguf: Path, ids: tuple[list[int], list[int], list[int]], cached: bool, reps: int, threads: int) -> dict | None:
    """llama-cpp-python on the same ids in a subprocess of its own: A1, B, then A2 timed (one token each)."""
    code = f"""
import json, sys, time
import llama_cpp
a1, b, a2 = json.loads(sys.stdin.read())
llm = llama_cpp.Llama({str(gguf)!r}, n_ctx={len(ids[2]) + 64}, n_threads={threads}, n_batch=512, verbose=False)
if {cached}:
    llm.set_cache(llama_cpp.LlamaRAMCache(capacity_bytes=4 << 30))
out = []
for rep in range({reps}):
    for p in (a1, b):
        llm.create_completion(p, max_tokens=1, temperature=0)
    t0 = time.perf_counter()
    llm.create_completion(a2, max_tokens=1, temperature=0)
    out.append(time.perf_counter() - t0)
print(json.dumps(out))
"""
    import json

    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama.cpp failed: {r.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    times = json.loads(r.stdout.strip().splitlines()[-1])
    return {"ttft": statistics.median(times), "all": times}


def parse_args(doc: str) -> argparse.Namespace:
    """The options this benchmark and bench_prompt_disk.py share."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="use this checkpoint instead of making one")
    ap.add_argument("--tokens", type=int, default=4000, help="the conversation's length before turn 1 (default 4000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; medians are printed (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both engines (default 2)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args


def peer_gguf(args: argparse.Namespace, path: Path, tmp: str) -> Path | None:
    """The checkpoint as a bf16 GGUF for llama-cpp-python, or None where its rows are skipped."""
    if args.no_llama_cpp:
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: llama-cpp-python not installed, skipped", file=sys.stderr)
        return None
    gguf = Path(tmp) / "bench.gguf"
    subprocess.run([sys.executable, "-m", "localglm", "export-gguf", str(path), str(gguf), "--type", "bf16", "-q"], check=True)
    return gguf


def main() -> None:
    args = parse_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else make_tiny(Path(tmp) / "bench-model", bench_spec())
        model = localglm.load(path, ctx=max(4096, args.tokens + 2048))
        msgs = conversation(model, args.tokens)
        cfg = model.config
        print(f"model: {path.name}  hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts "
              f"(top {cfg.num_experts_per_tok}), {model.dtype}, {args.threads} threads; {args.reps} reps, medians")  # fmt: skip
        rows = [("localglm, prompts set aside (default)", run_ours(model, msgs, None, args.reps)),
                ("localglm, --cache-ram 0", run_ours(model, msgs, 0, args.reps))]  # fmt: skip
        peer = []
        gguf = peer_gguf(args, path, tmp)
        if gguf is not None:
            ids = token_ids(model, msgs)
            for label, on in (("llama.cpp, LlamaRAMCache", True), ("llama.cpp, no cache", False)):
                res = run_llama(gguf, ids, on, args.reps, args.threads)
                if res is not None:
                    peer.append((label, res))
        on, off = rows[0][1], rows[1][1]
        print(f"turn 2 prompt: {on['prompt']} tokens (after a {len(SIDE)}-message side request)")
        print("| engine | cached prompt tokens | turn-2 TTFT, client | runs | engine alone | RAM set aside |\n|---|---:|---:|---|---:|---:|")
        for label, r in rows:
            print(f"| {label} | {r['cached']:.0f} | {r['ttft'] * 1000:.0f} ms | {', '.join(f'{t * 1000:.0f}' for t in r['all'])} | "
                  f"{r['engine'] * 1000:.0f} ms | {r['ram'] / 2**20:.0f} MiB |")  # fmt: skip
        for label, r in peer:  # in-process on token ids: its time is the engine's alone
            print(f"| {label} | - | - | {', '.join(f'{t * 1000:.0f}' for t in r['all'])} | {r['ttft'] * 1000:.0f} ms | - |")
        print(f"turn-2 TTFT, set aside vs not: {off['ttft'] / on['ttft']:.1f}x faster")
        if len(peer) == 2:
            print(f"llama.cpp's LlamaRAMCache vs none: {peer[1][1]['ttft'] / peer[0][1]['ttft']:.1f}x; engine alone, ours vs llama.cpp's "
                  f"cached (speed): {peer[0][1]['ttft'] / on['engine']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
