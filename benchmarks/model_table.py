"""The README's "what each GLM needs" table, made by `localglm plan` itself so that it cannot drift.

For every published config in tests/data/real_configs.json whose architecture localglm runs, and for
routed experts at 2, 4 and 8 bits (the other weights at `localglm quantize`'s defaults for those bits:
q8, and attention at q4 beside 2-bit experts), it runs `localglm plan --json` twice, at the default context (4096 tokens):

- CPU only (`--gpu-mem 0`): RAM for everything, and the predicted decode tok/s;
- one 24 GiB GPU: the least VRAM that runs at all (always-used weights, KV cache, workspace and the
  minimum expert cache), the RAM the routed experts need, and the predicted decode tok/s on 24 GiB.

Disk is the quantized checkpoint: every weight at its planned size. The tok/s are the planner's cost
model with its assumed bandwidths (PCIe 4.0, dual-channel DDR5, a 1 TFLOP/s CPU), not measurements.

    python benchmarks/model_table.py            # markdown table on stdout
    python benchmarks/model_table.py --check README_TABLE.md   # exit 1 if a saved table differs
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localglm.cli import main  # noqa: E402
from localglm.models import ARCHITECTURES  # noqa: E402

CONFIGS = ROOT / "tests" / "data" / "real_configs.json"
BITS = (2, 4, 8)
REST_CLASSES = ("attn", "shared", "dense", "embed", "lm_head")


def quantize_defaults(bits: int) -> list[str]:
    """The recipe flags `localglm quantize --experts BITS` leaves at their defaults, spelled out for `plan`
    (which would otherwise pick the always-used weights' precision itself)."""
    from quant.recipe import default_bits

    d = default_bits(bits)
    return [f for c in REST_CLASSES for f in (f"--{c.replace('_', '-')}", str(d[c]))]
GPU = "24GiB"
NOT_WEIGHTS = ("KV cache", "workspace", "expert staging", "expert cache")


def plan(model_dir: Path, *flags: str) -> dict[str, Any]:
    """`localglm plan MODEL --json FLAGS`, parsed."""
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["plan", str(model_dir), "--json", "--cpu-mem", "4TiB", *flags])
    if rc != 0:
        raise SystemExit(f"localglm plan {model_dir} {' '.join(flags)} failed")
    return json.loads(out.getvalue())


def gib(n: float) -> str:
    """GiB with two decimals, rounded up (a stated need must be enough)."""
    return f"{math.ceil(n / 2**30 * 100) / 100:.2f}"


BITS_NAME = {16: "bf16", 8: "q8", 4: "q4", 2: "q2"}


def row(name: str, model_dir: Path, bits: int) -> str:
    cpu = plan(model_dir, "--gpu-mem", "0", "--experts", str(bits), *quantize_defaults(bits))
    # On the GPU the planner picks the always-used precision: q8 there keeps a dense bf16 copy for its
    # CUDA kernel (more VRAM than bf16), so a card takes bf16 where it fits, else q4.
    gpu = plan(model_dir, "--gpu-mem", GPU, "--experts", str(bits))
    disk = sum(i["bytes"] for i in cpu["items"] if not i["what"].startswith(NOT_WEIGHTS))
    ram_cpu = sum(i["bytes"] for i in cpu["items"] if i["where"].startswith("RAM"))
    # the least VRAM that runs: everything on the GPU but the expert cache, plus two layers' worth of slots
    k = json.loads((model_dir / "config.json").read_text())["num_experts_per_tok"]
    vram = sum(i["bytes"] for i in gpu["items"] if i["where"] == "GPU" and not i["what"].startswith("expert cache")) + 2 * k * gpu["slot_bytes"]
    ram_gpu = sum(i["bytes"] for i in gpu["items"] if i["where"].startswith("RAM"))
    always = BITS_NAME.get(gpu["dense_bits"]["attn"], str(gpu["dense_bits"]["attn"]))
    return (
        f"| {name} | {bits} | {gib(disk)} | {gib(ram_cpu)} | {cpu['decode_tok_s']:.1f} | {always} | {gib(vram)} | {gib(ram_gpu)} | "
        f"{gpu['decode_tok_s']:.1f} |"
    )


def table() -> str:
    configs = json.loads(CONFIGS.read_text())
    lines = [
        f"| model | expert bits | disk (GiB) | CPU only: RAM (GiB) | CPU only: tok/s | GPU: always-used weights | GPU: least VRAM (GiB) | {GPU} GPU: RAM (GiB) | {GPU} GPU: tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs.items():
            if cfg.get("model_type") not in ARCHITECTURES:
                skipped.append(name)
                continue
            d = Path(tmp) / name
            d.mkdir()
            (d / "config.json").write_text(json.dumps(cfg))
            lines += [row(name, d, bits) for bits in BITS]
    note = (
        f"\nPredicted by `localglm plan` at ctx 4096, other weights q8 on the CPU and the planner's choice on the GPU (benchmarks/model_table.py); "
        "tok/s from the cost model's assumed bandwidths, not measured."
    )
    if skipped:
        note += f" Not yet runnable, so not listed: {', '.join(skipped)}."
    return "\n".join(lines) + "\n" + note + "\n"


def cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="FILE", help="compare with a saved table; exit 1 when it has drifted")
    args = ap.parse_args()
    text = table()
    if args.check:  # the rows must appear in FILE as one block; the prose around them is the README's
        saved = Path(args.check).read_text(encoding="utf-8")
        rows = "\n".join(line for line in text.splitlines() if line.startswith("|"))
        if rows not in saved:
            print(f"{args.check}: the table has drifted from `localglm plan`; regenerate it", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
