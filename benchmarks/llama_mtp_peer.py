"""llama.cpp's own kernels drafting with a GLM checkpoint's MTP block: the peer beside bench_mtp's rows.

llama-cpp-python binds the experimental MTP API of its bundled libllama but ships no driver for it, so
this module is the driver, a greedy speculative loop written the way llama.cpp's `draft-mtp` runs it:

- the target context (the main model) outputs, for every token of a batch, the hidden state the MTP
  block takes (`llama_set_embeddings_nextn(ctx, true, masked=false)`);
- an MTP-type context on the same model (`ctx_type = LLAMA_CONTEXT_TYPE_MTP`, its own KV cache for the
  block) decodes (token t_p, hidden h_{p-1}) at position p, both in one `llama_batch` (token ids and
  `embd` rows together, as upstream's draft-mtp fills it: this build's `llama_batch_ext_set_embd_state`
  is a stub that returns false), and drafts t_{p+1}; chained drafts feed the block's own output back;
- the target verifies the k+1 tokens in one batch, the longest agreeing prefix is kept, and both KV
  caches are trimmed with `llama_memory_seq_rm` (the MTP cache keeps the seed row, which had the true h).

Caught while wiring it: this build hands the block the main model's hidden state *after* the final
norm (`output_norm`), and chains the block's output *after* `shared_head.norm`, where GLM's MTP (and
localglm, and how the packaged model was trained) takes the streams before those norms. RMSNorm is
invariant to the scale of its input, so dividing a normed row by the norm's weight gives back the
stream's direction, which is all the block's `hnorm` sees: the peer does that (`prenorm_direction`),
so its drafts are the checkpoint's; `--raw-h` feeds the rows as llama.cpp hands them, for comparison.

    python benchmarks/llama_mtp_peer.py --gguf M.gguf --ids ids.json --new 64 --threads 1 --drafts 1,2,3

prints one JSON line (bench_mtp.py --llama-cpp runs it in its own subprocess and prints the rows).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


def prenorm_direction(normed: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Undo an RMSNorm's weight: rows of rms_norm(h) * weight -> h / rms(h), which a following RMSNorm
    treats exactly as h (it sees only the direction)."""
    return (normed / weight).astype(np.float32, copy=False)


class MtpBackend(Protocol):
    """What the speculative loop needs from an engine (llama.cpp's, or a test's stand-in)."""

    def reset(self) -> None: ...

    def target(self, tokens: Sequence[int], pos: int) -> tuple[np.ndarray, np.ndarray]:
        """Decode tokens at pos.. on the main model: (greedy next id per row, the block's h per row)."""
        ...

    def draft(self, tokens: Sequence[int], pos: int, hidden: np.ndarray) -> tuple[int, np.ndarray]:
        """Decode (tokens, hidden rows) at pos.. on the MTP block: (greedy id after the last row, its
        output row, the h for a chained draft)."""
        ...

    def trim(self, target_end: int, draft_end: int) -> None:
        """Forget the positions from target_end on (main model) and from draft_end on (MTP block)."""
        ...


@dataclass
class Run:
    """One setting over all prompts: decode speed and, for speculation, drafts and acceptance."""

    draft: int
    tokens: list[list[int]] = field(default_factory=list)
    decode_tokens: int = 0
    decode_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    depths: dict[int, int] = field(default_factory=dict)  # verification steps by the number of drafts they checked

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def per_step(self) -> float:
        """Tokens per verification step (accepted drafts + the target's own token), as bench_mtp reports."""
        return (self.accepted + self.steps) / self.steps if self.steps else 1.0


def greedy_plain(backend: MtpBackend, prompt: Sequence[int], new: int, run: Run) -> list[int]:
    """Plain greedy decoding, one token per main-model step; decode time from the first token on."""
    backend.reset()
    ids, _ = backend.target(prompt, 0)
    out = [int(ids[-1])]
    t0 = time.perf_counter()
    while len(out) < new:
        ids, _ = backend.target(out[-1:], len(prompt) + len(out) - 1)
        out.append(int(ids[-1]))
    run.decode_s += time.perf_counter() - t0
    run.decode_tokens += len(out) - 1
    run.tokens.append(out)
    return out


def greedy_speculative(backend: MtpBackend, prompt: Sequence[int], new: int, depth: int, run: Run) -> list[int]:
    """Greedy speculative decoding with the MTP block drafting `depth` tokens a step.

    MTP position p holds (t_p, h_{p-1}); `pending` are the rows the block has not seen yet (accepted
    tokens with their main-model h, the last one the seed of the next draft), decoded together with it."""
    backend.reset()
    n = len(prompt)
    ids, h = backend.target(prompt, 0)
    out = [int(ids[-1])]
    pos = n  # where out[-1] goes in the main model's cache
    pend_t, pend_h, pend_pos = [*prompt[1:], out[-1]], h, 1  # the block's rows at pend_pos..
    t0 = time.perf_counter()
    while len(out) < new:
        k = min(depth, new - len(out) - 1)
        drafts: list[int] = []
        if k > 0:
            d, g = backend.draft(pend_t, pend_pos, pend_h)
            drafts.append(d)
            while len(drafts) < k:
                d, g = backend.draft(drafts[-1:], pos + len(drafts), g[None])
                drafts.append(d)
        ids, h = backend.target([out[-1], *drafts], pos)
        accepted = 0
        while accepted < len(drafts) and int(ids[accepted]) == drafts[accepted]:
            accepted += 1
        new_ids = [*drafts[:accepted], int(ids[accepted])]
        run.drafted += len(drafts)
        run.accepted += accepted
        run.steps += 1  # depth-0 steps too, as localglm's SpecCounters counts them
        run.depths[len(drafts)] = run.depths.get(len(drafts), 0) + 1
        # Kept: out[-1] and the accepted drafts (main model); the seed row at `pos` (MTP block, its h was
        # the main model's). Next: the accepted drafts with their h, and the new last token as the seed.
        backend.trim(pos + accepted + 1, pos + 1 if drafts else pend_pos)
        if drafts:
            pend_t, pend_h, pend_pos = new_ids, h[: accepted + 1], pos + 1
        else:
            pend_t, pend_h = [*pend_t, *new_ids], np.concatenate([pend_h, h[:1]])
        out.extend(new_ids)
        pos += accepted + 1
    run.decode_s += time.perf_counter() - t0
    del out[new:]
    run.decode_tokens += len(out) - 1
    run.tokens.append(out)
    return out


class LlamaCppMtp:
    """The target and MTP contexts of one llama.cpp model, through llama-cpp-python's ctypes bindings."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int, n_batch: int = 64, raw_h: bool = False) -> None:
        import llama_cpp as L
        from llama_cpp import llama_cpp_ext as X

        self.L, self.X = L, X
        L.llama_log_set(_QUIET, None)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.load_mtp = True
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise SystemExit(f"{gguf}: llama.cpp could not load it")
        if L.llama_model_n_layer_nextn(self.model) < 1:
            raise SystemExit(f"{gguf}: no MTP block (nextn layers 0: exported with --no-mtp?)")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.width = L.llama_model_n_embd_out(self.model)
        self.n_batch = n_batch
        self.calls: dict[str, list[float]] = {}  # "target 2": [decodes, seconds] (where the time goes)
        self.ctx = self._context(L.LLAMA_CONTEXT_TYPE_DEFAULT, threads, n_ctx)
        self.mtp = self._context(L.LLAMA_CONTEXT_TYPE_MTP, threads, n_ctx)
        # Unmasked on the MTP context too: with masked=true this build returns the batch's *first* row's
        # h however the outputs are marked (a seed decoded behind catch-up rows would chain from it).
        X.llama_set_embeddings_nextn(self.mtp, True, False)
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        # The MTP graph takes the token ids and the h rows of one batch: llama_batch_init allocates only
        # one of token/embd, so the token ids live here (as upstream's draft-mtp mallocs them).
        self.mbatch = L.llama_batch_init(n_batch, self.width, 1)
        self._mtokens = (L.llama_token * n_batch)()
        self.mbatch.token = ctypes.cast(self._mtokens, ctypes.POINTER(L.llama_token))
        self._membd = np.ctypeslib.as_array(self.mbatch.embd, shape=(n_batch, self.width))
        self.h_norm, self.g_norm = (None, None) if raw_h else _norm_weights(gguf)
        self.set_nextn(True)

    def _context(self, kind: int, threads: int, n_ctx: int) -> Any:
        cp = self.L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, self.n_batch, self.n_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.ctx_type = kind
        ctx = self.L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise SystemExit(f"llama.cpp: llama_init_from_model failed (ctx_type {kind})")
        return ctx

    def set_nextn(self, on: bool) -> None:
        """Whether the main model outputs the block's h rows (off for the plain rows: no extra copy)."""
        self.X.llama_set_embeddings_nextn(self.ctx, on, False)
        self.nextn = on

    def close(self) -> None:
        self.mbatch.token = None  # ours, not llama_batch_free's
        self.L.llama_batch_free(self.mbatch)
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.mtp)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)

    def reset(self) -> None:
        for ctx in (self.ctx, self.mtp):
            self.L.llama_memory_clear(self.L.llama_get_memory(ctx), True)

    def _fill(self, batch: Any, tokens: Sequence[int], pos: int, all_logits: bool) -> None:
        if len(tokens) > self.n_batch:
            raise ValueError(f"{len(tokens)} tokens in one batch, at most {self.n_batch}")
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(tokens) - 1
        batch.n_tokens = len(tokens)

    def _decode(self, ctx: Any, batch: Any, what: str) -> None:
        t0 = time.perf_counter()
        rc = self.L.llama_decode(ctx, batch)
        tally = self.calls.setdefault(f"{what} {batch.n_tokens}", [0, 0.0])
        tally[0] += 1
        tally[1] += time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode({what}) returned {rc}")

    def _argmax(self, ctx: Any, i: int) -> int:
        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, i), shape=(self.vocab,)).argmax())

    def target(self, tokens: Sequence[int], pos: int) -> tuple[np.ndarray, np.ndarray]:
        many = len(tokens) > 1 and self.nextn
        self._fill(self.batch, tokens, pos, all_logits=many)
        self._decode(self.ctx, self.batch, "target")
        rows = range(len(tokens)) if many else [len(tokens) - 1]
        ids = np.array([self._argmax(self.ctx, i if many else -1) for i in rows])
        if not self.nextn:
            return ids, np.empty((0, self.width), np.float32)
        # Unmasked: one row per batch token, in batch order.
        h = np.ctypeslib.as_array(self.X.llama_get_embeddings_nextn(self.ctx), shape=(len(tokens), self.width))
        return ids, (h.copy() if self.h_norm is None else prenorm_direction(h, self.h_norm))

    def draft(self, tokens: Sequence[int], pos: int, hidden: np.ndarray) -> tuple[int, np.ndarray]:
        self._fill(self.mbatch, tokens, pos, all_logits=False)
        self._membd[: len(tokens)] = hidden
        self._decode(self.mtp, self.mbatch, "mtp")
        g = np.ctypeslib.as_array(self.X.llama_get_embeddings_nextn(self.mtp), shape=(len(tokens), self.width))[-1]
        return self._argmax(self.mtp, -1), (g.copy() if self.g_norm is None else prenorm_direction(g, self.g_norm))

    def trim(self, target_end: int, draft_end: int) -> None:
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), 0, target_end, -1)
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.mtp), 0, draft_end, -1)


def _quiet(level: int, text: bytes, data: Any) -> None:
    pass


_QUIET: Any = None  # the ctypes callback, made on first use (and kept alive: llama.cpp holds the pointer)


def _norm_weights(gguf: Path) -> tuple[np.ndarray, np.ndarray]:
    """output_norm and the MTP block's shared_head.norm weights: the norms this llama.cpp applies to the
    rows it hands over (see the module's docstring)."""
    from gguf import GGUFReader

    found = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(str(gguf)).tensors if t.name.endswith("norm.weight")}
    head = [name for name in found if name.endswith("nextn.shared_head_norm.weight")]
    if "output_norm.weight" not in found or not head:
        raise SystemExit(f"{gguf}: no output_norm / nextn.shared_head_norm weight to undo")
    return found["output_norm.weight"], found[head[0]]


def measure(backend: MtpBackend, prompts: list[list[int]], new: int, drafts: Sequence[int], rounds: int = 1,
            set_nextn: Callable[[bool], None] = lambda on: None) -> dict[str, Any]:  # fmt: skip
    """Plain greedy, then speculation at each depth, over the same prompts, `rounds` times in turn: each
    setting's fastest round (the one least slowed by other processes; wall and CPU figures each their
    best), as a dict."""
    calls: dict[str, list[float]] = getattr(backend, "calls", {})

    def ms_per_call() -> dict[str, float]:
        """Mean ms per decode since the last call, by context and batch size (prompts' batches included)."""
        out = {k: 1e3 * s / n for k, (n, s) in sorted(calls.items()) if n >= 8}
        calls.clear()
        return out

    def decode(prompt: list[int], n: int, run: Run) -> None:
        if run.draft == 0:
            greedy_plain(backend, prompt, n, run)
        else:
            greedy_speculative(backend, prompt, n, run.draft, run)

    def one(depth: int) -> tuple[Run, dict[str, float], float]:
        """A run of every prompt: its Run, ms per decode, and generated tokens per second of this process's
        CPU time over the whole requests (prompts included: time other processes take does not count)."""
        set_nextn(depth > 0)
        decode(prompts[0][:8], 8, Run(depth))  # warm-up: graphs allocated outside the timing
        ms_per_call()
        run, cpu0 = Run(depth), time.process_time()
        for p in prompts:
            decode(p, new, run)
        cpu = time.process_time() - cpu0
        return run, ms_per_call(), sum(map(len, run.tokens)) / max(cpu, 1e-9)

    best: dict[int, tuple[Run, dict[str, float]]] = {}
    best_cpu: dict[int, float] = {}
    for _ in range(rounds):
        for depth in (0, *drafts):
            run, ms, cpu = one(depth)
            if depth in best and run.tokens != best[depth][0].tokens:
                raise RuntimeError(f"draft {depth}: a round's output differs from the first round's")
            if depth not in best or run.decode_s < best[depth][0].decode_s:
                best[depth] = (run, ms)
            best_cpu[depth] = max(best_cpu.get(depth, 0.0), cpu)
    plain = best[0][0]

    def row(r: Run, ms: dict[str, float]) -> dict[str, Any]:
        same = sum(a == b for a, b in zip(r.tokens, plain.tokens))
        figures = {"tok_s": r.tok_s, "tok_cpu_s": best_cpu[r.draft], "per_step": r.per_step, "same_as_plain": same, "ms_per_call": ms}
        return {k: v for k, v in asdict(r).items() if k != "tokens"} | figures

    rows = [row(*best[d]) for d in (0, *drafts)]
    return {"plain": rows[0], "tokens": plain.tokens, "spec": rows[1:], "prompts": len(prompts), "rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True, help="a GGUF with its MTP tensors (localglm export-gguf, without --no-mtp)")
    ap.add_argument("--ids", type=Path, required=True, help="a JSON list of prompts, each a list of token ids")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--drafts", default="1,2,3", help="draft depths, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="every setting this many times in turn; the fastest round is kept")
    ap.add_argument("--raw-h", action="store_true", help="feed the block the rows as llama.cpp hands them (after the final norms)")
    args = ap.parse_args()
    global _QUIET
    import llama_cpp

    _QUIET = llama_cpp.llama_log_callback(_quiet)
    for path in (args.gguf, args.ids):
        if not path.is_file():
            raise SystemExit(f"llama_mtp_peer: error: {path}: no such file")
    prompts = json.loads(args.ids.read_text())
    drafts = [int(d) for d in args.drafts.split(",")]
    n_ctx = max(len(p) for p in prompts) + args.new + max(drafts) + 8
    n_batch = max(64, max(len(p) for p in prompts) + max(drafts) + 1)
    peer = LlamaCppMtp(args.gguf, args.threads, n_ctx=max(n_ctx, 64), n_batch=n_batch, raw_h=args.raw_h)
    try:
        result = measure(peer, prompts, args.new, drafts, args.rounds, peer.set_nextn)
    finally:
        peer.close()
    print(json.dumps(result | {"raw_h": args.raw_h, "llama_cpp": llama_cpp.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
