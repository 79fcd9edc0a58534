"""The turn after a seeded (plain-decoded) turn, with the MTP layer loaded and without: time to first
token and prompt tokens reused. Plain decoding leaves the MTP block's state behind the main cache; a
drafting turn that had to rebuild it used to prefill the whole prompt again (192-202 ms against 3 ms
here on 2026-12-07, before the fix). With the fix, both rows reuse the prompt.

    python benchmarks/bench_mtp_resume.py                 # the packaged default model, 1 thread, 3 runs
    python benchmarks/bench_mtp_resume.py --model DIR --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
from pathlib import Path

import torch

import localglm
from localglm.default_model import default_model_path
from localglm.stats import GenerationStats


def conversation(model: localglm.Model, rep: int) -> list[dict]:
    """About 1,200 tokens: a file to explain (the default model's context is 2,048)."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")[:4000]
    return [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": f"Explain this file:\n{text}\nattempt {rep}"}]


def measure(path: Path, mtp: bool, runs: int) -> tuple[list[float], list[int], int]:
    model = localglm.load(path, mtp=mtp)
    ttft, reused, prompt = [], [], 0
    for rep in range(runs):
        ids = model.encode_chat(conversation(model, rep)).ids
        seeded = localglm.SamplingParams(temperature=0.7, seed=rep)  # plain decoding (the adaptive depth)
        out = list(model.stream_tokens(ids, max_new_tokens=16, sampling=seeded))
        turn2 = ids + out + model.tokenizer.encode("<|user|>\nthanks<|assistant|>")
        stats = GenerationStats()
        list(model.stream_tokens(turn2, max_new_tokens=16, sampling=localglm.SamplingParams(temperature=0), stats=stats))
        ttft.append(stats.ttft_s)
        reused.append(stats.cached_prompt_tokens)
        prompt = stats.prompt_tokens
    return ttft, reused, prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint with an MTP layer (default: the packaged model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    print(f"model: {path.name}, {args.threads} thread(s), {args.runs} runs: a seeded turn, then an unseeded greedy one (timed)")
    print("| MTP layer | turn-2 TTFT (median) | runs | prompt tokens reused |\n|---|---:|---|---:|")
    for mtp in (True, False):
        ttft, reused, prompt = measure(path, mtp, args.runs)
        print(f"| {'loaded (--mtp)' if mtp else '--no-mtp'} | {statistics.median(ttft) * 1000:.1f} ms | "
              f"{', '.join(f'{t * 1000:.1f}' for t in ttft)} | {min(reused)} of {prompt} |")  # fmt: skip


if __name__ == "__main__":
    main()
