"""The cost of constrained decoding per token, beside a decode token's time, with llama.cpp's grammar as the peer.

    python benchmarks/bench_grammar.py              # the packaged default model (8k vocab), the ~0.9B random model,
                                                    # and GLM's 151,552-token vocabulary
    python benchmarks/bench_grammar.py --quick      # fewer tokens (a smoke run)

For each grammar (an agent's JSON schema; GLM tool calls with `tool_choice: auto`, whose free text
excludes GLM's tags) the same token sequence (a valid document, tokenized) is fed through
`GrammarProcessor` and each step timed two ways:
- sync: the whole mask (matcher update, llguidance mask, bit unpacking, masked_fill) on the critical path;
- prefetched: what stays on the critical path when the engine calls `on_token` right after sampling,
  so llguidance computes the mask during the forward pass: the token update plus applying the mask.
Decode time is the engine's own (greedy, 2 threads by default) on the same model; the 151k rows divide
by the 0.9B model's and by the default model's decode time (their lm_heads are 4k and 8k wide: a real
151k head only makes decode slower, so the shares shown are upper bounds). The 151k tokenizer is GLM-shaped: the default model's byte-level
BPE vocabulary, extended to 151,552 entries with concatenations of its tokens (llguidance's token
trie is what the mask walks), GLM's special tokens at the top. llama.cpp (the `bench` extra) is the
peer: its decode time per token with and without a GBNF grammar from the same JSON schema, on the
0.9B model's GGUF. Run on a quiet machine; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import DEFAULT_DIR, ensure_model, ensure_gguf, prompt_ids  # noqa: E402

import localglm  # noqa: E402
from localglm.chat.tokenizer import Tokenizer  # noqa: E402
from localglm.default_model import default_model_path  # noqa: E402
from localglm.grammar import GrammarProcessor, GrammarVocab, OutputSpec, ToolGrammar, output_grammar  # noqa: E402

GLM_VOCAB = 151_552
GLM_FIRST_SPECIAL = 151_329
SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "edits": {"type": "array", "items": {"type": "object", "properties": {
            "old_string": {"type": "string"}, "new_string": {"type": "string"}, "replace_all": {"type": "boolean"}},
            "required": ["old_string", "new_string"], "additionalProperties": False}},
        "mode": {"enum": ["fast", "careful"]},
    },
    "required": ["path", "edits", "mode"],
    "additionalProperties": False,
}  # fmt: skip
DOC = {"path": "src/server/app.py", "edits": [
    {"old_string": "def create_app(model):", "new_string": "def create_app(model, settings=None):", "replace_all": False},
    {"old_string": "return app", "new_string": "app.state.ready = True\n    return app"}], "mode": "careful"}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "edit_file", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {
             "command": {"type": "string"}, "timeout": {"type": "integer"}}, "required": ["command"]}}}]  # fmt: skip
CALL = ("I will fix the server's factory so it takes the settings, then run the tests.\n<tool_call>bash\n<arg_key>command</arg_key>\n"
        "<arg_value>python -m pytest -q tests/test_server.py -k 'create_app and settings'</arg_value>\n<arg_key>timeout</arg_key>\n"
        "<arg_value>600</arg_value>\n</tool_call>")  # fmt: skip


def wide_tokenizer(base_dir: Path, size: int = GLM_VOCAB) -> Tokenizer:
    """The default model's tokenizer, its BPE vocabulary extended to `size` entries as GLM's is."""
    data = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    specials = sorted(data["added_tokens"], key=lambda t: t["id"])
    base = sorted(vocab, key=vocab.get)
    rng = random.Random(0)
    pieces = [t for t in base if len(t) > 1]
    while len(vocab) < GLM_FIRST_SPECIAL:
        word = rng.choice(pieces) + rng.choice(pieces).lstrip("Ġ")
        if word not in vocab:
            vocab[word] = len(vocab)
    for i, tok in enumerate(specials):
        tok["id"] = GLM_FIRST_SPECIAL + i
    data["added_tokens"] = specials
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    config = json.loads((base_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    return Tokenizer(backend, config=config, source=f"{base_dir} widened to {size}")


def stop_ids(tok: Tokenizer) -> list[int]:
    return [i for i in (tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")) if i is not None]


def grammars(tok: Tokenizer) -> dict[str, tuple[str, list[int]]]:
    """name -> (Lark grammar, a valid output's token ids)."""
    doc = json.dumps(DOC)
    tools = output_grammar(OutputSpec("none", None, ToolGrammar(TOOLS, "auto")))
    return {
        "json_schema": (output_grammar(OutputSpec("none", SCHEMA, None)), tok.encode(doc)),
        "tools (auto)": (tools, tok.encode(CALL)),
    }


def mask_costs(vocab: GrammarVocab, grammar: str, ids: list[int], rounds: int) -> tuple[float, float]:
    """Median microseconds per token on the critical path: (sync, prefetched)."""
    logits = torch.zeros(vocab.vocab_size)
    sync: list[float] = []
    pre: list[float] = []
    for _ in range(rounds):
        proc = GrammarProcessor(vocab, grammar, prefetch=False)
        for k in range(len(ids)):
            t0 = time.perf_counter()
            proc(ids[:k], logits)
            sync.append(time.perf_counter() - t0)
        proc = GrammarProcessor(vocab, grammar)
        for k in range(len(ids)):
            t0 = time.perf_counter()
            if k:
                proc.on_token(ids[:k])
            t_on = time.perf_counter() - t0
            if proc._pending is not None:
                proc._pending.result()  # the forward pass would run here
            t0 = time.perf_counter()
            proc(ids[:k], logits)
            pre.append(t_on + time.perf_counter() - t0)
    return statistics.median(sync) * 1e6, statistics.median(pre) * 1e6


def decode_ms(model: localglm.Model, tokens: int) -> float:
    stats = localglm.GenerationStats()
    ids = prompt_ids(32, model.config.vocab_size)
    for _ in model.stream_tokens(ids, max_new_tokens=tokens, sampling=localglm.SamplingParams(temperature=0), stats=stats, reuse_prefix=False):
        pass
    return stats.decode_s / max(1, stats.decode_tokens - 1) * 1000


def llama_cpp_grammar_ms(gguf: Path, tokens: int, threads: int) -> tuple[float, float] | None:
    """llama.cpp's decode ms/token without and with a GBNF grammar from SCHEMA (None without llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    eos = {llm.token_eos(): -1e9}
    out = []
    for g in (None, grammar):
        t0 = time.perf_counter()
        r = llm.create_completion("x", max_tokens=tokens, temperature=0.0, grammar=g, logit_bias=None if g else eos)
        n = r["usage"]["completion_tokens"]
        out.append((time.perf_counter() - t0) / max(1, n) * 1000)
        llm.reset()
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR, help="the larger model (default: the ~0.9B random one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens, rounds = (16, 1) if args.quick else (48, 3)
    load = os.getloadavg()
    rows = []
    default_dir = default_model_path()
    small = localglm.load(default_dir)
    big_dir = ensure_model(args.model)
    big = localglm.load(big_dir)
    d_small, d_big = decode_ms(small, tokens), decode_ms(big, tokens)
    wide = wide_tokenizer(default_dir)
    cases = [
        ("default model", small.tokenizer, small.config.vocab_size, d_small),
        (f"{big_dir.name}", big.tokenizer, big.config.vocab_size, d_big),
        (f"GLM vocab / {big_dir.name}", wide, GLM_VOCAB, d_big),
        ("GLM vocab / default model", wide, GLM_VOCAB, d_small),  # a small model's decode: the strictest ratio
    ]
    for label, tok, size, dec in cases:
        t0 = time.perf_counter()
        vocab = GrammarVocab(tok, size, stop_ids(tok))
        build = time.perf_counter() - t0
        for name, (grammar, ids) in grammars(tok).items():
            sync, pre = mask_costs(vocab, grammar, ids, rounds)
            rows.append((label, size, name, dec, sync, pre, build))
    peer = None
    gguf = ensure_gguf(big_dir) if big_dir == DEFAULT_DIR else None
    if gguf is not None:
        peer = llama_cpp_grammar_ms(gguf, tokens, args.threads)
    print(f"constrained decoding cost per token ({args.threads} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    head = f"{'model / vocabulary':<28} {'vocab':>7} {'grammar':<13} {'decode ms':>9} {'mask sync us':>12} {'share':>6} {'prefetched us':>13} {'share':>6} {'vocab build s':>13}"
    print(head)
    print("-" * len(head))
    for label, size, name, dec, sync, pre, build in rows:
        print(f"{label:<28} {size:>7} {name:<13} {dec:>9.2f} {sync:>12.1f} {sync / 10 / dec:>5.2f}% {pre:>13.1f} {pre / 10 / dec:>5.2f}% {build:>13.2f}")
    if peer is not None:
        plain, constrained = peer
        print(f"peer llama.cpp ({big_dir.name} GGUF, GBNF from the same schema): decode {plain:.2f} ms/token, with grammar "
              f"{constrained:.2f} ms/token ({(constrained - plain) / plain * 100:+.1f}%)")
    else:
        print("peer llama.cpp: not run (needs llama-cpp-python, the `bench` extra, and the 0.9B model's GGUF)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
