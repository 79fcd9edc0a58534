"""`localglm plan MODEL`: the placement plan from a checkpoint's description alone (no weights read).

MODEL is anything `generate` takes: a Hugging Face directory (config.json), a localglm quantized
directory (planned at the bits its manifest says it holds) or a GGUF (its metadata; its experts, and
the always-used weights loading keeps as stored, at the bits per weight they are stored in). It takes
the recipe flags of `quantize` and `generate` (`--experts 4`, `--attn 8`, ...): the bits a flag gives
are kept; the always-used classes left unset get the most precise of bf16 / q8 / q4 that fits the GPU
budget, and the plan says which it chose.
The default context is generate's: min(4096, the model's max_position_embeddings).
Where the config declares an MTP block (speculative drafts, on by default as in generate; --no-mtp
leaves it out), the plan places its always-used weights and KV cache beside the model's and counts
its routed experts with the others (they go through the same expert cache).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import LocalGLMError
from ..model_info import KV_PLACES
from .flags import add_recipe_options, build_recipe, recipe_bits


def cmd_plan(args: argparse.Namespace) -> int:
    from offload.cost_model import Bandwidths, measure_bandwidths
    from offload.planner import DENSE_CLASSES, plan_with_mtp

    from ..model_info import check_ctx, default_ctx, read_checkpoint

    info = read_checkpoint(args.model)
    cfg = info.config
    ctx = args.ctx if args.ctx is not None else default_ctx(cfg)  # what generate, chat and serve would use
    check_ctx(cfg, ctx, str(args.model))
    if args.bandwidths:
        try:
            bw = Bandwidths.load(args.bandwidths)
        except (OSError, ValueError, TypeError) as exc:
            raise LocalGLMError(f"--bandwidths {args.bandwidths}: cannot read ({exc})") from None
    elif args.measure:
        bw = measure_bandwidths("cuda" if args.gpu_mem != "0" else "cpu")
    else:
        bw = Bandwidths()
    recipe = build_recipe(args)  # validates the flags; the given classes are kept as given
    given = {c for c, v in recipe_bits(args).items() if v is not None}
    if args.q_layers:
        raise LocalGLMError("plan: --layers overrides are not planned per layer; give class bits (--experts, --attn, ...)")
    fixed = {c: recipe.bits[c] for c in DENSE_CLASSES if c in given}
    experts: float = recipe.bits["experts"]
    if info.kind == "quantized":  # its bits are what it holds: the recipe flags are for float checkpoints
        if given:
            flags = ", ".join(f"--{c.replace('_', '-')}" for c in sorted(given))
            raise LocalGLMError(f"plan: {args.model} is a localglm quantized checkpoint ({info.stored.label}); {flags} apply to float checkpoints")
        experts, fixed = info.stored.expert_bits, dict(info.stored.class_bits)
    elif info.kind == "gguf":  # what loading the GGUF keeps as stored, for the classes no flag sets
        if "experts" not in given:
            experts = info.stored.expert_bits
        fixed |= {c: b for c, b in info.stored.class_bits.items() if c not in given}
    mtp = _mtp_placement(args, info, recipe.bits["mtp"], recipe.bits["mtp"] if "experts" in given or info.kind == "safetensors" else None)
    # Float weights at the compute dtype loading takes from the checkpoint (fp32 stays fp32; plan said bf16 fit where load refused)
    float_bits = 32 if str(args.dtype or cfg.torch_dtype).lower().removeprefix("torch.") in ("float32", "fp32") else 16
    plan = plan_with_mtp(cfg, args.gpu_mem, args.cpu_mem, ctx, experts, bw, model=str(args.model), fixed=fixed, kv=args.kv, mtp=mtp,
                         required=bool(args.mtp), float_bits=float_bits)
    if args.json:
        print(json.dumps(asdict(plan)))
    else:
        print(plan.table())
    return 0


def _mtp_placement(args: argparse.Namespace, info: Any, bits: float, expert_bits: float | None) -> Any:
    """The MTP block to plan (planner.MtpPlacement), None where the config has none or --no-mtp: at the
    recipe's "mtp" bits (8 by default; a quantized directory's as stored), its experts at those bits
    (a GGUF's: its experts' as stored), with its own embedding / head where a Hugging Face index or a
    quantized directory names them (else the main model's, as GGUF files have it)."""
    from quant.recipe import KEEP

    from offload.planner import MtpPlacement

    cfg = info.config
    if args.mtp is False or cfg.num_nextn_predict_layers <= 0:
        return None
    prefix = f"model.layers.{cfg.num_hidden_layers}"
    names: set[str] = set()
    root = Path(args.model).expanduser()
    root = root if root.is_dir() else root.parent
    if info.kind == "quantized":
        from ..checkpoint.quantized_dir import QuantizedSource

        with QuantizedSource(root, verify=False) as q:
            bits = q.recipe.bits["mtp"]
            lay = q.layouts.get(cfg.num_hidden_layers)
            expert_bits = lay.nbytes * 8 / (3 * cfg.hidden_size * cfg.moe_intermediate_size) if lay is not None else 16.0
            names = {n for n in (f"{prefix}.embed_tokens.weight", f"{prefix}.shared_head.head.weight") if n in q}
    elif info.kind == "safetensors" and (root / "model.safetensors.index.json").is_file():
        try:
            names = set(json.loads((root / "model.safetensors.index.json").read_text()).get("weight_map", {}))
        except (OSError, ValueError, AttributeError):
            names = set()  # an unreadable index: loading reports it; plan with the main model's embedding and head
    bits = 16 if bits == KEEP else bits
    own = (f"{prefix}.embed_tokens.weight" in names, f"{prefix}.shared_head.head.weight" in names)
    return MtpPlacement(bits, float(expert_bits if expert_bits is not None else info.stored.expert_bits), *own)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="show where each part of a model would live for given GPU/RAM budgets, and the predicted tok/s",
        description="Reads config.json (or a GGUF's metadata) and the weight files' headers only. Sizes accept GiB/GB/MiB "
        "suffixes; --gpu-mem 0 plans a CPU-only run. Recipe flags as for quantize/generate: --experts BITS is the routed "
        "experts' format (default 4; a GGUF's as stored); the always-used classes (--attn, --shared, --dense, --embed, "
        "--lm-head) not given get the most precise of bf16, q8 and q4 that fits. A localglm quantized directory is "
        "planned at the bits it holds.",
    )
    p.add_argument("model", help="model directory, config.json, localglm quantized directory, or .gguf file")
    p.add_argument("--gpu-mem", default=None, help="VRAM budget (default: free VRAM minus 512 MiB; 0 without a GPU)")
    p.add_argument("--cpu-mem", default=None, help="RAM budget (default: available RAM minus 4 GiB)")
    p.add_argument("--ctx", type=int, default=None, help="context size for the KV cache (default: as generate, min(4096, model max))")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="the compute dtype loading will use, for the weights kept in float (default: the checkpoint's, as generate)")
    p.add_argument(
        "--kv", default="auto", choices=KV_PLACES,
        help="where the KV cache lives with a GPU: 'gpu', or 'ram' (GLM-5.x's sparse attention only: the latent rows in "
        "pinned RAM, each token's top-k gathered to the GPU, the indexer keys on the GPU); default auto: both are planned "
        "and the faster that fits is kept",
    )  # fmt: skip
    add_recipe_options(p, title="precision (bits per tensor class, as for quantize and generate)")
    p.add_argument("--bandwidths", default=None, help="JSON file of measured bandwidths (see offload.cost_model.Bandwidths)")
    p.add_argument("--measure", action="store_true", help="measure RAM/CPU (and GPU) bandwidths here first")
    p.add_argument(
        "--mtp", action=argparse.BooleanOptionalAction, default=None,
        help="place the MTP block (speculative drafts) too; default: where the config declares one, as generate loads it",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)
