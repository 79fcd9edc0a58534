"""`localglm quantize SRC OUT`: write a localglm quantized directory (recipe flags: commands/flags.py).

    localglm quantize ~/models/GLM-4.5-Air ~/models/GLM-4.5-Air-q4 --experts 4 --attn 8
    localglm quantize SRC OUT --experts 2 --layers 0-3:experts=4 --report
    localglm quantize GLM-4.5-Air-Q4_K_M-00001-of-00002.gguf ~/models/air-q4 --experts 4
    localglm generate ~/models/GLM-4.5-Air --experts 4 --save-quantized ~/models/air-q4 -p "Hi"
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .flags import add_recipe_options, build_recipe, set_threads, size_flag
from .progress import progress

DESCRIPTION = """\
Quantize a GLM checkpoint (Hugging Face layout, or a glm4moe / deepseek2 / glm-dsa GGUF file) into a localglm
quantized directory: routed experts as one contiguous blob each, other weights per the recipe, a
manifest, config, tokenizer and template copied (from a GGUF: written from its metadata). Streams
shard by shard (peak memory about one output shard plus the tensors in flight). GGUF K-/I-quants are
dequantized tensor by tensor (experts one at a time) and re-quantized; Q8_0 held at 8 bits is taken
as stored. A failed or interrupted run leaves OUT as it was and removes its partial output.
--overwrite replaces only an earlier quantize output (the files its manifest lists): OUT must hold
nothing else and must not contain SRC. OUT may not lie inside a SRC directory. The manifest records each shard's CRC-32; loading checks them.
"""
EPILOG = """\
bits: 2, 4, 8, or 16 (= keep the checkpoint's float weights). Formats: q8 = int8, groups of 32, fp16 scales (8.53 bpw),
q4 / q2 = 4 / 2-bit codes, groups of 32, least-squares fitted scale + offset, 8-bit coded (4.56 / 2.56 bpw).
defaults: --experts 4 --shared 8 --dense 8 --attn 8 --embed 8 --lm-head 8 --router 16 --indexer 16;
--experts 2 also makes --attn 4 unless --attn is given.
--layers FIRST-LAST:CLASS=BITS[,CLASS=BITS] overrides a layer range (repeatable), e.g. --layers 0-2:experts=8.
A class flag or --layers range that matches no tensor of SRC (--indexer on a model without DSA) is
quantized as asked and named in a warning.
"""

def register(sub: Any) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a checkpoint to 2/4/8-bit (localglm format)", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("src", help="Hugging Face model directory, or a .gguf file (of a split set: any part)")
    p.add_argument("out", help="output directory")
    add_recipe_options(p)
    p.add_argument("--max-shard-size", default="256M", help="output shard size (default 256M)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier quantize output holding nothing else")
    p.add_argument("--report", action="store_true", help="print per-class relative weight error")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (at most the cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..quantize import quantize_checkpoint

    set_threads(args.threads)
    recipe = build_recipe(args)
    shard = size_flag(args.max_shard_size, "--max-shard-size", positive=True)
    with progress("quantizing", quiet=args.quiet, in_bytes=True) as update:
        tick = (lambda done, total, name: update(done, total, "")) if update else None
        res = quantize_checkpoint(args.src, args.out, recipe, max_shard_bytes=shard, overwrite=args.overwrite, progress=tick, report=args.report)
    print(f"wrote {res.out}: {res.out_bytes / 2**20:.1f} MiB from {res.source_bytes / 2**20:.1f} MiB "
          f"({res.bits_per_weight:.2f} bits/weight overall) in {res.seconds:.1f} s, peak RSS {res.peak_rss_bytes / 2**20:.0f} MiB")  # fmt: skip
    print(f"recipe: {recipe.describe()}")
    for cls, bpw in sorted(res.class_bits.items()):
        err = f"  relative error {res.class_error[cls]:.4f}" if cls in res.class_error else ""
        print(f"  {cls:<8} {bpw:6.2f} bits/weight{err}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
