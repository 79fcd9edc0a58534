"""`localglm export-gguf SRC OUT.gguf --type TYPE`: write a llama.cpp GGUF from a Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

from .flags import size_flag
from .progress import progress

DESCRIPTION = """\
Write the GLM checkpoint SRC (Hugging Face layout) as a GGUF that llama.cpp loads: arch glm4moe for
GLM-4.5/4.6/4.7, deepseek2 for GLM-4.7-Flash, glm-dsa for GLM-5.x, with the same tensor names, types and metadata its convert_hf_to_gguf.py writes. Reads one tensor at a
time and streams it out, so memory stays small whatever the model size. Norms, biases and routers stay F32.
"""
EPILOG = """\
types: f32, f16, bf16, q8_0 (as convert_hf_to_gguf.py --outtype), q4_0 (every weight Q4_0 except the
output head, Q8_0; as llama-quantize Q4_0 would, save that it uses Q6_K for the head).
"""

def register(sub: Any) -> None:
    from ..checkpoint.gguf_out_types import OUT_TYPES

    p = sub.add_parser(
        "export-gguf",
        help="write a llama.cpp GGUF (glm4moe, deepseek2, glm-dsa) from a checkpoint",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="model directory (Hugging Face layout: config.json, *.safetensors, tokenizer.json)")
    p.add_argument("out", help="output file, NAME.gguf (split parts become NAME-0000i-of-0000N.gguf)")
    p.add_argument("--type", dest="out_type", choices=list(OUT_TYPES), default="f16", help="tensor type (default: f16)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP (next-token prediction) layer")
    p.add_argument("--split-max-size", default=None, metavar="SIZE", help="split into parts of at most SIZE (e.g. 2G)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export_gguf)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from ..checkpoint.gguf import export_gguf

    split = size_flag(args.split_max_size, "--split-max-size") if args.split_max_size else 0
    with progress("exporting", quiet=args.quiet, in_bytes=True) as update:
        tick = (lambda done, total, name: update(done, total, "")) if update else None
        paths = export_gguf(args.src, args.out, args.out_type, mtp=not args.no_mtp, split_max_size=split, overwrite=args.overwrite, progress=tick)
    for path in paths:
        print(f"wrote {path}")
    return 0
