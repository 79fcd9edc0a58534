"""Decode speed of a GGUF K-quant mix run as stored: localglm beside llama.cpp on the same file.

    python benchmarks/bench_gguf_kquant.py                      # 2 threads, the mix below on random weights
    python benchmarks/bench_gguf_kquant.py --threads 1 --new 32
    python benchmarks/bench_gguf_kquant.py --make-fixture tests/data/glm4_moe_kquant_mix.gguf
    python benchmarks/bench_gguf_kquant.py --kernels            # one-token products per type, beside llama.cpp's
    python benchmarks/bench_gguf_kquant.py --kernels --tokens 64  # the same with a prompt's 64 tokens

The file is made the way the published dynamic GLM quants are: random GLM-shaped weights exported to
F32 by `localglm export-gguf`, then llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`,
llama-cpp-python's bundled libllama) with per-tensor type overrides (`--tensor-type` in
llama-quantize): routed experts Q2_K gate/up with Q3_K down, IQ4_XS / Q4_K in the next layer,
attention Q4_K/Q5_K/Q6_K/Q5_0, shared experts Q4_0, output Q6_K (MIX). Every engine runs in its own
subprocess (bench_generate's workers) on the same prompt, greedy. Figures compare only within one run.

--kernels: each type's one-token product (decode) alone, ours (quant/kquants.py kq_matmul_q8) beside
llama.cpp's mul_mat of the same blocks (benchmarks/ggml_peer.py: repacked where its CPU backend repacks),
at the mix's shapes and GLM-4.5-Air's expert shapes; each weight copied until ~96 MiB are cycled
through, so rows stream from memory as in decode; CPU time, rounds interleaved, the best round. The last
column compares the two results; a repacked weight's result read back through this ctypes setup is not
valid (NaNs: its repacked layout is timed, its output is not checked), so those rows show n/a.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import BENCH_ROOT, available  # noqa: E402
from ggml_peer import GGML_TYPE  # noqa: E402  (ggml.h's type ids)

# tensor-name regex -> type, first match wins (llama-quantize --tensor-type): a dynamic mix like the published GLM ones
MIX = (
    (r"blk\.1\.ffn_(gate|up)_exps", "Q2_K"), (r"blk\.1\.ffn_down_exps", "Q3_K"),
    (r"ffn_(gate|up)_exps", "IQ4_XS"), (r"ffn_down_exps", "Q4_K"),
    (r"_shexp", "Q4_0"), (r"attn_q\.", "Q4_K"), (r"attn_k\.", "Q5_0"), (r"attn_v\.", "Q6_K"),
    (r"attn_output", "Q5_K"), (r"blk\.0\.ffn_", "Q5_K"), (r"token_embd", "Q4_K"), (r"output\.weight", "Q6_K"),
)  # fmt: skip
# A small model whose every row is a whole number of K-quant blocks (256): the test fixture.
FIXTURE_SPEC = dict(
    dtype="float32", vocab_size=512, hidden_size=256, head_dim=64, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=512, moe_intermediate_size=256, n_routed_experts=4, num_experts_per_tok=2, num_hidden_layers=3, seed=11,
)  # fmt: skip
# The benchmark model: GLM-4.5-Air's per-layer widths (hidden 4096, 96/8 heads x 128, experts 1408 wide, top-8),
# 4 layers (1 dense, dense width 10944) with 32 experts and a 4K vocabulary, random weights.
BENCH_SPEC = dict(
    dtype="bfloat16", vocab_size=4096, hidden_size=4096, head_dim=128, num_attention_heads=96, num_key_value_heads=8,
    intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=32, num_experts_per_tok=8, num_hidden_layers=4,
    num_nextn_predict_layers=0, use_qk_norm=False, max_shard_bytes=500_000_000,
)  # fmt: skip


def llama_quantize(src: Path, out: Path, mix: tuple[tuple[str, str], ...] = MIX, base: int = 10, threads: int = 2) -> Path:
    """llama.cpp's quantizer on `src` (F32/BF16 GGUF): base ftype (10 = Q2_K) with per-tensor overrides."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = base, threads
    over = (llama_cpp.llama_model_tensor_override * (len(mix) + 1))()
    for i, (pattern, kind) in enumerate(mix):
        over[i].pattern, over[i].type = pattern.encode(), GGML_TYPE[kind]
    over[len(mix)].pattern = None
    p.tt_overrides = ctypes.cast(over, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    out.parent.mkdir(parents=True, exist_ok=True)
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(p)) != 0:
        raise SystemExit(f"llama.cpp's quantizer failed on {src}")
    return out


def make_mix(out: Path, spec: dict, work: Path, keep: bool = True) -> Path:
    """Random weights of `spec` (glm4_moe) -> F32/BF16 GGUF (localglm export-gguf) -> the MIX by llama.cpp;
    without `keep` the random checkpoint and the float GGUF are removed afterwards (GBs at Air widths)."""
    import shutil

    from localglm.checkpoint.gguf import export_gguf
    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    model = work / "model"
    if not (model / "config.json").is_file():
        make_tiny(model, TinySpec(**spec), overwrite=True)
    flat = work / "flat.gguf"
    if not flat.is_file():
        export_gguf(model, flat, "f32" if spec["dtype"] == "float32" else "bf16", mtp=False)
    llama_quantize(flat, out)
    if not keep:
        shutil.rmtree(model)
        flat.unlink()
    return out


# The i-quant fixture (tests/data/glm4_moe_iquant_mix.gguf): every i-quant type in routed experts (gate/up,
# down), shared experts, attention and the dense MLP, as the published IQ1/IQ2 GLM quants mix them.
IQ_MIX = (
    (r"blk\.1\.ffn_(gate|up)_exps", "IQ2_XXS"), (r"blk\.1\.ffn_down_exps", "IQ3_XXS"),
    (r"blk\.2\.ffn_(gate|up)_exps", "IQ2_XS"), (r"blk\.2\.ffn_down_exps", "IQ3_S"),
    (r"blk\.3\.ffn_(gate|up)_exps", "IQ1_S"), (r"blk\.3\.ffn_down_exps", "IQ2_S"),
    (r"_shexp", "IQ1_M"), (r"attn_q\.", "IQ3_S"), (r"attn_k\.", "IQ2_S"), (r"attn_v\.", "IQ3_XXS"),
    (r"attn_output", "IQ2_XS"), (r"blk\.0\.ffn_", "IQ3_XXS"), (r"token_embd", "Q4_K"), (r"output\.weight", "Q6_K"),
)  # fmt: skip
IQ_FIXTURE_SPEC = dict(FIXTURE_SPEC, num_hidden_layers=4, seed=12)


def make_iq_mix(out: Path, spec: dict, work: Path) -> Path:
    """Random weights of `spec` -> F32 GGUF (localglm export-gguf) -> a copy whose 2-D weights are in IQ_MIX's
    types, quantized by llama.cpp's own code (ggml_peer.Ggml.quantize), the rest (metadata, norms, routers) as is."""
    import re

    import gguf
    from ggml_peer import Ggml

    g = Ggml()
    from localglm.checkpoint.gguf import export_gguf
    from localglm.models.glm4_moe.tiny import TinySpec
    from localglm.tiny import make_tiny

    model, flat = work / "model", work / "flat.gguf"
    make_tiny(model, TinySpec(**spec), overwrite=True)
    export_gguf(model, flat, "f32", mtp=False)
    reader = gguf.GGUFReader(flat)
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        kind = next((k for pattern, k in IQ_MIX if re.search(pattern, t.name)), None) if t.name.endswith(".weight") and len(t.shape) >= 2 else None
        data = t.data.reshape(tuple(int(d) for d in reversed(t.shape)))
        if kind is None:
            writer.add_tensor(t.name, data)
        else:
            blocks = g.quantize(kind, data.reshape(-1, data.shape[-1])).reshape(*data.shape[:-1], -1)
            writer.add_tensor(t.name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def types_of(path: Path) -> dict[str, int]:
    import gguf

    kinds: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return kinds


def ensure_bench_mix() -> Path:
    """The Air-width K-quant mix, made once (random weights, llama.cpp's quantizer) under the bench cache."""
    work = BENCH_ROOT / "air-kquant-mix"
    path = work / "air-mix.gguf"
    if not path.is_file():
        print(f"writing {path} (random weights, llama.cpp's quantizer) ...", file=sys.stderr)
        make_mix(path, BENCH_SPEC, work, keep=False)
    return path


def measure(threads: int, prompt: int, new: int, repeat: int = 1) -> dict:
    """Ours and llama.cpp on the mix, each in its own subprocess, interleaved `repeat` times (medians)."""
    from bench_generate import run_workers

    from localglm.models.glm4_moe.tiny import TinySpec

    path = ensure_bench_mix()
    load = os.getloadavg()
    jobs = [(engine, engine, path) for engine in ("localglm", "llama.cpp")]
    rows = run_workers(jobs, prompt, new, threads, TinySpec(**BENCH_SPEC).vocab_size, repeat)
    return {"path": str(path), "mib": path.stat().st_size / 2**20, "types": types_of(path), "threads": threads,
            "prompt": prompt, "new": new, "load_avg": load, "rows": rows}  # fmt: skip


def table(res: dict) -> str:
    """The markdown table of `measure`'s result, ratios ours / llama.cpp and the load average."""
    load = res["load_avg"]
    lines = [f"GGUF K-quant mix as stored: {Path(res['path']).name} ({res['mib']:.0f} MiB; tensor types {res['types']}); "
             f"{res['threads']} threads, prompt {res['prompt']}, new {res['new']}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
             "", "| engine | decode tok/s | prefill tok/s | decode tok/CPU-s | prefill tok/CPU-s | load s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for engine, r in res["rows"].items():
        lines.append(f"| {engine} | failed | | | | |" if r is None else f"| {engine} | {r['decode_tok_s']:.2f} | {r['prompt_tok_s']:.1f} | "
                     f"{r['decode_cpu_tok_s']:.2f} | {r['prompt_cpu_tok_s']:.1f} | {r['load_s']:.1f} |")  # fmt: skip
    ours, theirs = res["rows"]["localglm"], res["rows"]["llama.cpp"]
    if ours and theirs:
        lines += ["", f"ours / llama.cpp: decode {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x, "
                      f"prefill {ours['prompt_tok_s'] / theirs['prompt_tok_s']:.2f}x; per CPU second (less disturbed by other "
                      f"processes): decode {ours['decode_cpu_tok_s'] / theirs['decode_cpu_tok_s']:.2f}x, "
                      f"prefill {ours['prompt_cpu_tok_s'] / theirs['prompt_cpu_tok_s']:.2f}x"]  # fmt: skip
    return "\n".join(lines)


# (type, rows, row length): the mix's one-token products and Air's expert shapes (1408 wide) in other types
KERNEL_CASES = (
    ("Q4_K", 12288, 4096), ("Q4_K", 1408, 4096), ("Q5_K", 4096, 12288), ("Q5_K", 10944, 4096), ("Q6_K", 1024, 4096),
    ("Q6_K", 4096, 4096), ("Q2_K", 1408, 4096), ("Q3_K", 1408, 4096), ("IQ4_XS", 1408, 4096), ("Q5_0", 4096, 1408),
    ("Q4_0", 1408, 4096), ("Q4_0", 4096, 1408), ("Q5_1", 4096, 10944),
)  # fmt: skip
# --kernels --iq: the i-quants at GLM-5's routed-expert shapes (hidden 6144, expert width 2048)
IQ_KERNEL_CASES = tuple((kind, n, k) for kind in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M") for n, k in ((2048, 6144), (6144, 2048)))


def measure_kernels(cases: tuple[tuple[str, int, int], ...] = KERNEL_CASES, seconds: float = 1.5, rounds: int = 3, stream_bytes: int = 96 << 20,
                    tokens: int = 1) -> list[dict]:
    """Per case: ours and llama.cpp's seconds per product with `tokens` tokens (1: decode; more: a prompt's;
    best of `rounds` interleaved rounds of CPU time), the bytes read, and the largest difference between
    the two results relative to their scale."""
    import math
    import time

    import numpy as np
    import torch

    from ggml_peer import Ggml, MulMat

    from quant.kquants import GGML_TYPES, GGMLSpec, kquant_lib

    lib = kquant_lib()
    if lib is None:
        raise SystemExit("the native K-quant kernels did not build (see the log above)")
    g, rng, rows = Ggml(), np.random.default_rng(0), []
    for kind, n, k in cases:
        q = g.quantize(kind, rng.standard_normal((n, k), dtype=np.float32))
        copies = max(1, math.ceil(stream_bytes / q.nbytes)) if tokens == 1 else 1  # a prompt's product reuses the weight from cache anyway
        ours_w = [torch.from_numpy(q.copy()) for _ in range(copies)]
        peer = MulMat(g, kind, q, n, k, copies, tokens=tokens)
        x = rng.standard_normal((tokens, k), dtype=np.float32)
        peer.set_x(x)
        xt, y, cid = torch.from_numpy(x), torch.empty(tokens, n), GGML_TYPES[kind].cid
        spec = GGMLSpec.of(kind)

        def ours(c: int) -> None:
            lib._lib.kq_matmul_q8(cid, ours_w[c].data_ptr(), n, k, xt.data_ptr(), tokens, y.data_ptr(), 1)

        peer.run(0)
        want, got = peer.result(0), lib.matmul(spec, ours_w[0], (n, k), xt, int8=True).numpy()
        best = {"ours": math.inf, "llama.cpp": math.inf}
        for _ in range(rounds):
            for name, f in (("ours", ours), ("llama.cpp", peer.run)):
                reps, c0 = 0, time.process_time()
                while time.process_time() - c0 < seconds / rounds:
                    f(reps % copies)
                    reps += 1
                best[name] = min(best[name], (time.process_time() - c0) / reps)
        peer.close()
        rows.append(dict(type=kind, n=n, k=k, tokens=tokens, bytes=q.nbytes, ours_s=best["ours"], llama_s=best["llama.cpp"], repacked=peer.repacked,
                         rel_diff=float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))))  # fmt: skip
    return rows


def kernel_table(rows: list[dict]) -> str:
    load = os.getloadavg()
    tokens = rows[0]["tokens"] if rows else 1
    what = "One-token products" if tokens == 1 else f"Products with {tokens} tokens"
    rate = "GB/s" if tokens == 1 else "G mult-adds/s"
    lines = [f"{what} per type, 1 thread, CPU time, best of interleaved rounds; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
             "", f"| type | rows x width | MiB | ours ms | {rate} | llama.cpp ms | {rate} | ours / llama.cpp (speed) | results differ by |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        peer = "llama.cpp repacked" if r["repacked"] else "llama.cpp"
        work = r["bytes"] if tokens == 1 else r["n"] * r["k"] * tokens
        lines.append(f"| {r['type']} | {r['n']} x {r['k']} | {r['bytes'] / 2**20:.1f} | {r['ours_s'] * 1e3:.3f} | {work / r['ours_s'] / 1e9:.1f} | "
                     f"{r['llama_s'] * 1e3:.3f} ({peer}) | {work / r['llama_s'] / 1e9:.1f} | {r['llama_s'] / r['ours_s']:.2f}x | {'n/a' if r['repacked'] else format(r['rel_diff'], '.1e')} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new", type=int, default=24, help="new tokens (default 24)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per engine, interleaved, medians reported (default 1)")
    ap.add_argument("--kernels", action="store_true", help="per-type one-token products beside llama.cpp's instead of the model run")
    ap.add_argument("--tokens", type=int, default=1, help="with --kernels: tokens per product (default 1, decode; e.g. 64 for a prompt's)")
    ap.add_argument("--iq", action="store_true", help="with --kernels: the i-quant types (IQ1_S ... IQ3_S) at GLM-5's expert shapes")
    ap.add_argument("--make-fixture", type=Path, default=None, metavar="OUT", help="write the small test fixture and stop")
    ap.add_argument("--make-iq-fixture", type=Path, default=None, metavar="OUT", help="write the small i-quant test fixture and stop")
    args = ap.parse_args()
    if args.make_iq_fixture is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = make_iq_mix(args.make_iq_fixture, IQ_FIXTURE_SPEC, Path(tmp))
        print(f"{out}: {out.stat().st_size} bytes, {types_of(out)}")
        return 0
    if args.make_fixture is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = make_mix(args.make_fixture, FIXTURE_SPEC, Path(tmp))
        print(f"{out}: {out.stat().st_size} bytes, {types_of(out)}")
        return 0
    if not available("llama.cpp"):
        raise SystemExit("llama-cpp-python is needed (pip install -e '.[bench]')")
    if args.kernels:
        print(kernel_table(measure_kernels(IQ_KERNEL_CASES if args.iq else KERNEL_CASES, tokens=max(1, args.tokens))))
        return 0
    res = measure(args.threads, args.prompt, args.new, args.repeat)
    print(table(res))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"} | {"rows": {k: {x: y for x, y in (v or {}).items() if x != "tokens"} for k, v in res["rows"].items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
