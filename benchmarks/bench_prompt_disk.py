"""Time to first token of an agent's next turn after the server restarted, with its conversation kept on
disk (`serve --cache-dir`) and without, beside llama-cpp-python's `LlamaDiskCache` on the same token ids.

An agent's history (system prompt, tools, files read) is thousands of tokens; before --cache-dir a
restarted server prefilled all of it again on the next turn. Scenario, per engine:

  1. process 1 answers turn 1 of a long coding-agent conversation, then stops (ours: `Model.keep_prompts`,
     what `serve` runs on Ctrl+C; timed, with the bytes written);
  2. process 2 starts with the same cache directory and answers turn 2 (turn 1 + a tool call and its
     result): time to its first token, timed.

Both engines run in their own processes. The files are read back from the OS page cache (a restart a
moment later; a cold disk adds its read time: bytes / disk speed).

    python benchmarks/bench_prompt_disk.py                    # ~4k-token conversation, 3 reps
    python benchmarks/bench_prompt_disk.py --tokens 8000 --threads 2
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_prefix_reuse import bench_spec, conversation
from bench_prompt_cache import parse_args, peer_gguf, token_ids

import localglm
from localglm.tiny import make_tiny

OURS = """
import json, shutil, sys, time
from pathlib import Path
import torch
import localglm
from localglm.prompt_cache import prompt_cache_for
from localglm.sampling import SamplingParams
from localglm.stats import GenerationStats
torch.set_num_threads({threads})
a1, a2 = json.loads(sys.stdin.read())
path, ctx, cache_dir, disk = {path!r}, {ctx}, Path({cache_dir!r}), {disk}
greedy = SamplingParams(temperature=0)
out = {{"ttft": [], "write_s": [], "bytes": []}}
for rep in range({reps}):
    shutil.rmtree(cache_dir, ignore_errors=True)
    first = localglm.load(path, ctx=ctx)  # process 1
    if disk:
        first.prompt_cache = prompt_cache_for(1 << 30, disk_dir=cache_dir, setup=first.setup)
    list(first.stream_tokens(a1, max_new_tokens=1, sampling=greedy))
    t0 = time.perf_counter()
    first.keep_prompts()
    out["write_s"].append(time.perf_counter() - t0)
    out["bytes"].append(sum(p.stat().st_size for p in cache_dir.rglob("*.safetensors")) if disk else 0)
    del first
    again = localglm.load(path, ctx=ctx)  # process 2
    if disk:
        again.prompt_cache = prompt_cache_for(1 << 30, disk_dir=cache_dir, setup=again.setup)
    stats = GenerationStats()
    t0 = time.perf_counter()
    next(iter(again.stream_tokens(a2, max_new_tokens=1, sampling=greedy, stats=stats)))
    out["ttft"].append(time.perf_counter() - t0)
    out["restored"] = stats.restored_prompt_tokens
    del again
print(json.dumps(out))
"""

LLAMA = """
import json, shutil, sys, time
from pathlib import Path
import llama_cpp
a1, a2 = json.loads(sys.stdin.read())
cache_dir, disk = Path({cache_dir!r}), {disk}
def engine():
    llm = llama_cpp.Llama({gguf!r}, n_ctx={ctx}, n_threads={threads}, n_batch=512, verbose=False)
    if disk:
        llm.set_cache(llama_cpp.LlamaDiskCache(cache_dir=str(cache_dir), capacity_bytes=32 << 30))
    return llm
out = {{"ttft": [], "write_s": [], "bytes": []}}
for rep in range({reps}):
    shutil.rmtree(cache_dir, ignore_errors=True)
    first = engine()  # process 1: the cache is written after the completion, inside it
    t0 = time.perf_counter()
    first.create_completion(a1, max_tokens=1, temperature=0)
    out["write_s"].append(time.perf_counter() - t0)
    out["bytes"].append(sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file()) if disk else 0)
    del first
    again = engine()  # process 2
    t0 = time.perf_counter()
    again.create_completion(a2, max_tokens=1, temperature=0)
    out["ttft"].append(time.perf_counter() - t0)
    del again
print(json.dumps(out))
"""


def run(code: str, ids: tuple[list[int], list[int]]) -> dict | None:
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True, cwd=Path(__file__).parent)
    if r.returncode != 0:
        print(f"failed: {r.stderr.strip()[-600:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else make_tiny(Path(tmp) / "bench-model", bench_spec())
        model = localglm.load(path)  # for the prompts' token ids
        ctx = min(max(4096, args.tokens + 2048), model.config.max_position_embeddings)
        a1, _, a2 = token_ids(model, conversation(model, args.tokens))
        cfg = model.config
        print(f"model: {path.name}  hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts "
              f"(top {cfg.num_experts_per_tok}), {model.dtype}, {args.threads} threads; {args.reps} reps, medians")  # fmt: skip
        print(f"turn 1: {len(a1)} tokens; turn 2 after the restart: {len(a2)} tokens")
        del model
        fill = {"threads": args.threads, "reps": args.reps, "ctx": ctx, "cache_dir": str(Path(tmp) / "cache")}
        rows = [
            ("localglm, --cache-dir", run(OURS.format(path=str(path), disk=True, **fill), (a1, a2))),
            ("localglm, no --cache-dir", run(OURS.format(path=str(path), disk=False, **fill), (a1, a2))),
        ]
        gguf = peer_gguf(args, path, tmp)
        if gguf is not None:
            for label, disk in (("llama.cpp, LlamaDiskCache", True), ("llama.cpp, no cache", False)):
                rows.append((label, run(LLAMA.format(gguf=str(gguf), disk=disk, **fill), (a1, a2))))
        print("| engine | turn-2 TTFT after restart | runs | written at stop (ours) / turn 1 with the write (llama.cpp) | on disk |")
        print("|---|---:|---|---:|---:|")
        med = {}
        for label, r in rows:
            if r is None:
                continue
            med[label] = statistics.median(r["ttft"])
            print(f"| {label} | {med[label] * 1000:.0f} ms | {', '.join(f'{t * 1000:.0f}' for t in r['ttft'])} | "
                  f"{statistics.median(r['write_s']) * 1000:.0f} ms | {statistics.median(r['bytes']) / 2**20:.1f} MiB |")  # fmt: skip
        if len(med) >= 2:
            ours = list(med.values())
            print(f"ours, restored vs prefilled: {ours[1] / ours[0]:.1f}x faster")
        if len(med) == 4:
            peer = list(med.values())[2:]
            print(f"llama.cpp, restored vs prefilled: {peer[1] / peer[0]:.1f}x faster; restored TTFT ours vs llama.cpp's: "
                  f"{peer[0] / ours[0]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
