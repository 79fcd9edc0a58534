"""Time to first token of an agent's second turn, with and without KV-cache prefix reuse, through `localglm serve`.

Coding agents resend the whole conversation every turn. The server keeps the KV cache of the
previous request and reuses the longest common token prefix, so turn 2 only prefills what is new
(the assistant's tool call and the tool result). This script builds a random GLM checkpoint with
`make-tiny` at bigger shapes, starts a real server on a loopback port (once with reuse, once with
`--no-prefix-reuse`), plays a long conversation's turn 1 (the model answers with a tool call) and
turn 2 (the tool result comes back), and prints the client-side time to first streamed token of
turn 2 for both, plus the server's own numbers (cached tokens, engine TTFT).

    python benchmarks/bench_prefix_reuse.py                  # ~4k-token conversation
    python benchmarks/bench_prefix_reuse.py --tokens 8000 --reps 5 --threads 2

The model's output is forced (the tool call and the final answer), so both runs do identical work
apart from the prefill that reuse saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import openai
import torch

import localglm
from localglm.server import ServerSettings, create_app
from localglm.server.testing import ScriptedOutput, ServerThread
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.tiny import make_tiny

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file from the repository and return its text.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite and return the report.",
            "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}},
        },
    },
]
SOURCES = ["textwrap.py", "shlex.py", "difflib.py", "argparse.py", "json/decoder.py", "heapq.py", "bisect.py"]


def bench_spec() -> TinySpec:
    """A few-hundred-MB-class shape: big enough that prefill dominates, small enough for 2 cores."""
    return TinySpec(
        vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, moe_intermediate_size=256,
        n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=32768, dtype="bfloat16",
    )  # fmt: skip


def conversation(model: localglm.Model, target_tokens: int) -> list[dict]:
    """A coding-agent history (system prompt, read_file calls and their results) of about `target_tokens`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    msgs: list[dict] = [
        {"role": "system", "content": "You are a coding agent. Read files with tools before changing them. " * 20},
        {"role": "user", "content": "Find out why the text wrapping tests fail and fix it."},
    ]
    i = 0
    while True:
        name = SOURCES[i % len(SOURCES)]
        text = (stdlib / name).read_text(encoding="utf-8")[:3000]
        call = {"id": f"call_{i}", "type": "function", "function": {"name": "read_file", "arguments": json.dumps({"path": name})}}
        step = [
            {"role": "assistant", "content": f"Let me read {name}.", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": text},
        ]
        if len(model.tokenizer.encode(model.render_chat(msgs + step, tools=TOOLS))) > target_tokens:
            return msgs
        msgs += step
        i += 1


CALL = "<tool_call>run_tests\n<arg_key>pattern</arg_key>\n<arg_value>test_textwrap</arg_value>\n</tool_call>"


def run(model: localglm.Model, msgs: list[dict], settings: ServerSettings, reps: int, side: list[dict] | None = None) -> dict:
    """Turn 1 (the model answers with a tool call), optionally another conversation's request `side`
    (its last message says SCRIPT:side), then turn 2 (the tool result comes back), timed."""
    scripts = ScriptedOutput(model)
    scripts.add("turn1", "I will run the tests." + CALL, end="<|observation|>")
    scripts.add("turn2", "The tests pass now.")
    scripts.add("side", "Fixing text wrapping tests")
    app = create_app(model, settings, logits_processor_hook=scripts)
    client_ttft, engine_ttft, cached, prompt = [], [], [], []
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=3600)
        for rep in range(reps):
            # Turn 1 (a different last message each rep, so the previous rep's turn 2 is not a prefix of it).
            turn1 = msgs + [{"role": "user", "content": f"Run the tests, attempt {rep}. SCRIPT:turn1"}]
            r1 = client.chat.completions.create(model="bench", messages=turn1, tools=TOOLS, temperature=0)
            if side is not None:
                client.chat.completions.create(model="bench", messages=side, temperature=0)
            tc = r1.choices[0].message.tool_calls[0]
            turn2 = turn1 + [
                {"role": "assistant", "content": r1.choices[0].message.content, "tool_calls": [tc.model_dump()]},
                {"role": "tool", "tool_call_id": tc.id, "content": "42 passed in 0.8s SCRIPT:turn2"},
            ]
            t0 = time.perf_counter()
            first = None
            final = None
            stream = client.chat.completions.create(
                model="bench", messages=turn2, tools=TOOLS, temperature=0, stream=True, stream_options={"include_usage": True}
            )
            for chunk in stream:
                for ch in chunk.choices:
                    if first is None and (ch.delta.content or getattr(ch.delta, "reasoning_content", None) or ch.delta.tool_calls):
                        first = time.perf_counter() - t0
                    if ch.finish_reason:
                        final = chunk
                if chunk.usage is not None:
                    prompt.append(chunk.usage.prompt_tokens)
                    cached.append(chunk.usage.prompt_tokens_details.cached_tokens)
            assert first is not None and final is not None
            client_ttft.append(first)
            engine_ttft.append(final.timings["ttft_ms"] / 1000)  # the engine's own: no HTTP, template, tokenizer
    return {
        "prompt": prompt[-1],
        "cached": statistics.median(cached),
        "client_ttft": statistics.median(client_ttft),
        "engine_ttft": statistics.median(engine_ttft),
        "all": client_ttft,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="use this checkpoint instead of making one")
    ap.add_argument("--tokens", type=int, default=4000, help="conversation length before turn 1 (default 4000)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; medians are printed (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or make_tiny(Path(tmp) / "bench-model", bench_spec())
        model = localglm.load(path, device=args.device, ctx=max(4096, args.tokens + 2048))
        msgs = conversation(model, args.tokens)
        cfg = model.config
        print(
            f"model: {Path(path).name}  hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"{cfg.n_routed_experts} experts (top {cfg.num_experts_per_tok}), {model.dtype}, {args.device}, "
            f"torch threads {torch.get_num_threads()}"
        )
        results = {}
        for reuse in (True, False):
            results[reuse] = run(model, msgs, ServerSettings(model_name="bench", reuse_prefix=reuse), args.reps)
        on, off = results[True], results[False]
        print(f"turn 2 prompt: {on['prompt']} tokens; {args.reps} reps, medians")
        print(f"{'':24}{'cached tok':>12}{'TTFT (client)':>16}{'TTFT (engine)':>16}")
        for label, r in (("with prefix reuse", on), ("without prefix reuse", off)):
            print(f"{label:24}{r['cached']:>12.0f}{r['client_ttft'] * 1000:>13.0f} ms{r['engine_ttft'] * 1000:>13.0f} ms")
        print(f"speed-up of turn-2 TTFT: {off['client_ttft'] / on['client_ttft']:.1f}x")


if __name__ == "__main__":
    main()
