"""The command-line flags shared by several commands, one home: the recipe flags (`--experts BITS`
... mean the same in `quantize`, `plan`, `eval` and every command that runs a model), the engine,
quantize-while-loading and offloading groups, sampling, and sizes. Each group comes with the function
that reads it back into `localglm.load` keywords, so a flag has one meaning from the parser to the kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LocalGLMError
from ..model_info import KV_PLACES, parse_size

# What a command that runs a model takes as MODEL: every format the loader reads.
MODEL_HELP = "a Hugging Face model directory, a localglm quantized directory, or a .gguf file (of a split set: any part)"
MODEL_OR_DEFAULT_HELP = MODEL_HELP + "; default: the packaged default model"

CLASS_FLAGS = (
    ("experts", "routed experts"),
    ("shared", "shared experts"),
    ("dense", "dense FFN layers"),
    ("attn", "attention projections (default 8; 4 with --experts 2)"),
    ("embed", "token embeddings"),
    ("lm-head", "output projection"),
    ("router", "MoE router (16 only)"),
    ("indexer", "sparse-attention indexer, GLM-5 (default 16)"),
)


def add_recipe_options(p: argparse.ArgumentParser, title: str = "quantization recipe (bits per tensor class)") -> Any:
    """--experts/--attn/... and --layers, in an argument group of their own (returned)."""
    g = p.add_argument_group(title)
    for flag, what in CLASS_FLAGS:
        g.add_argument(f"--{flag}", dest=f"q_{flag.replace('-', '_')}", metavar="BITS", default=None, help=f"bits for {what}")
    g.add_argument("--layers", dest="q_layers", action="append", default=None, metavar="A-B:CLASS=BITS", help="per-layer-range override (repeatable)")
    return g


def recipe_bits(args: argparse.Namespace) -> dict[str, Any]:
    """The class flags as given, after checking each is a format every command knows (2, 4, 8 or 16)."""
    from quant.recipe import ALLOWED_BITS

    bits = {flag.replace("-", "_"): getattr(args, f"q_{flag.replace('-', '_')}", None) for flag, _ in CLASS_FLAGS}
    allowed = ", ".join(map(str, ALLOWED_BITS[:-1])) + f" or {ALLOWED_BITS[-1]}"
    for cls, value in bits.items():
        if value is not None and str(value) not in {str(b) for b in ALLOWED_BITS}:
            raise LocalGLMError(f"--{cls.replace('_', '-')} {value}: bits must be one of {allowed} (16 keeps the checkpoint's float weights)")
    if bits["router"] is not None and str(bits["router"]) != "16":
        raise LocalGLMError(f"--router {bits['router']}: the router runs in fp32 and stays unquantized; only 16 is accepted")
    return bits


def build_recipe(args: argparse.Namespace) -> Any:
    from quant.spec import QuantError
    from quant.recipe import Recipe

    try:
        return Recipe.from_options(recipe_bits(args), args.q_layers or [])
    except QuantError as exc:
        raise LocalGLMError(str(exc)) from None


def quant_load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The quantization flags -> localglm.load options."""
    opts: dict[str, Any] = {f"{k}_bits": v for k, v in recipe_bits(args).items() if v is not None}
    if getattr(args, "q_layers", None):
        opts["quant_layers"] = args.q_layers
    if getattr(args, "save_quantized", None):
        if not opts:
            opts["experts_bits"] = 4
        opts["save_quantized"] = args.save_quantized
    return opts


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Device, dtype, context and threads, then the quantize-while-loading and offloading groups:
    every command that loads a model takes them all (read back by `load_options`)."""
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cpu; cuda with --offload cuda)")
    g.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the checkpoint's)")
    g.add_argument("--ctx", type=int, default=None, help="context size in tokens (default: min(4096, model max))")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: the physical cores other processes leave free, measured at start; at most the cores)")
    g.add_argument("--no-verify", action="store_true", help="skip checking a localglm quantized model's shards against their CRC-32s (a full read)")
    g.add_argument(
        "--mmap", action=argparse.BooleanOptionalAction, default=None,
        help="a localglm quantized model's routed experts stay in their memory-mapped files (nothing copied; the OS "
        "keeps the used ones in RAM, so a model bigger than RAM runs) or are copied into RAM; default: mapped when "
        "offloading or when they exceed the available RAM",
    )  # fmt: skip
    q = add_recipe_options(p, title="quantize while loading (bits per tensor class; default: as stored)")
    q.add_argument("--save-quantized", default=None, metavar="OUT", help="with --experts etc.: write the quantized model to OUT and load it from there")
    o = p.add_argument_group("expert offloading (plan the budgets first: `localglm plan MODEL`)")
    o.add_argument(
        "--offload", choices=("cuda", "sim"), default=None,
        help="dense weights, shared experts and the KV cache on the GPU, routed experts in RAM behind a GPU expert "
        "cache with router-guided prefetch ('cuda'; implies --device cuda), or on a simulated device ('sim')",
    )  # fmt: skip
    o.add_argument("--gpu-mem", default=None, metavar="SIZE", help="VRAM budget, e.g. 24GiB (default: free VRAM minus a margin)")
    o.add_argument("--cpu-mem", default=None, metavar="SIZE", help="RAM budget for the routed experts (default: available RAM minus a margin)")
    o.add_argument(
        "--kv", default=None, choices=KV_PLACES,
        help="where the KV cache lives: on the GPU, or (GLM-5's sparse attention only) its latent rows in pinned RAM with "
        "each token's top-k gathered to the GPU; default auto: the plan's faster choice that fits (`localglm plan` shows it)",
    )  # fmt: skip
    o.add_argument("--cache-policy", default=None, choices=("lru", "lfu", "stat"), help="expert-cache eviction (default stat: router statistics)")
    o.add_argument("--no-prefetch", action="store_true", help="copy experts only when a layer asks for them")
    o.add_argument("--trace", default=None, metavar="PATH", help="record every MoE layer's routing to PATH (.jsonl, for `localglm simulate`)")
    s = p.add_argument_group("speculative decoding (the checkpoint's own MTP layer drafts, the model verifies)")
    s.add_argument(
        "--mtp", action=argparse.BooleanOptionalAction, default=None,
        help="draft with the checkpoint's MTP (next-n prediction) layer; default: on where the checkpoint has one "
        "(offloaded: where the plan fits it beside the model, its experts through the same expert cache; `localglm plan` "
        "shows it), and each step drafts only as deep as it pays",
    )  # fmt: skip
    s.add_argument(
        "--draft", type=int, default=None, metavar="N",
        help="the most tokens drafted a step (default 3; each step picks 0..N from the measured acceptance and the "
        "price of the extra experts a wider verification reads; 0 turns speculation off)",
    )  # fmt: skip
    s.add_argument(
        "--draft-fixed", action="store_true",
        help="draft exactly N (--draft) tokens every step instead of the depth that pays: to measure one depth, or to "
        "speculate in a --seed run (reproducible, depths included; the adaptive depth decodes seeded runs without drafts)",
    )  # fmt: skip
    s.add_argument(
        "--draft-vocab", type=int, default=None, metavar="N",
        help="the drafter scores only the N most frequent tokens (the checkpoint's draft_vocab.json; the verification "
        "keeps the whole vocabulary, so output is unchanged); default 2048 where the file exists, else the whole head; "
        "0: the whole head. Make the file: python -m localglm.training.draft_vocab MODEL --text FILE...",
    )  # fmt: skip


def device_for(args: argparse.Namespace) -> str:
    """--device, defaulting to cuda when --offload cuda asks for the GPU."""
    return args.device or ("cuda" if getattr(args, "offload", None) == "cuda" else "cpu")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The quantization and offloading flags as `localglm.load` options."""
    opts = quant_load_options(args)
    offload = getattr(args, "offload", None)
    given = {k: getattr(args, k, None) for k in ("gpu_mem", "cpu_mem", "cache_policy", "kv")}
    for k in ("gpu_mem", "cpu_mem"):  # read here so that a bad size names its flag
        if given[k] is not None:
            size_flag(given[k], f"--{k.replace('_', '-')}")
    if offload == "sim" and given["gpu_mem"] is None:
        raise LocalGLMError("--offload sim needs --gpu-mem SIZE, the simulated device's budget (`localglm plan MODEL --gpu-mem SIZE` shows what fits)")
    if offload:
        opts.update(offload=offload, prefetch=not getattr(args, "no_prefetch", False), **{k: v for k, v in given.items() if v is not None})
    else:
        flags = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None] + (["--no-prefetch"] if getattr(args, "no_prefetch", False) else [])
        if flags:
            raise LocalGLMError(f"{', '.join(flags)}: these flags need --offload cuda (or sim)")
    if getattr(args, "trace", None):
        opts["trace"] = args.trace
    if getattr(args, "mmap", None) is not None:
        opts["mmap"] = args.mmap
    if getattr(args, "no_verify", False):
        opts["verify"] = False
    from ..options import MAX_DRAFT

    draft = getattr(args, "draft", None)
    if draft is not None and not 0 <= draft <= MAX_DRAFT:
        raise LocalGLMError(f"--draft {draft}: the most drafted tokens a step is 0 (no speculation) to {MAX_DRAFT}")
    if getattr(args, "draft_vocab", None) is not None and args.draft_vocab < 0:
        raise LocalGLMError(f"--draft-vocab {args.draft_vocab}: the most frequent tokens the drafter scores, 0 (the whole head) or more")
    for key in ("mtp", "draft", "draft_vocab"):
        if getattr(args, key, None) is not None:
            opts[key] = getattr(args, key)
    if getattr(args, "draft_fixed", False):
        if getattr(args, "mtp", None) is False:
            raise LocalGLMError("--draft-fixed: drafts come from the MTP layer, which --no-mtp leaves out; drop one of them")
        opts["draft_fixed"] = True
    return opts


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(n: int | None) -> None:
    """--threads: at least 1, and at most the usable cores (torch.set_num_threads(1000000) starts that many
    threads and segfaults on the first matmul; more threads than cores only slow the kernels down).
    Not given: the physical cores other processes leave free now (localglm.threads.default_threads)."""
    import torch

    if n is None:
        from ..threads import default_threads

        torch.set_num_threads(default_threads())
        return
    if n < 1:
        raise LocalGLMError(f"--threads must be at least 1, got {n}")
    cores = usable_cores()
    if n > cores:
        print(f"localglm: warning: --threads {n} is more than the {cores} usable cores; using {cores}", file=sys.stderr)
    torch.set_num_threads(min(n, cores))


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--temperature", "--temp", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", "--repeat-penalty", type=float, default=None, help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def add_model_run_options(
    p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int], *, quiet_help: str = "no progress bar while loading"
) -> None:
    """What every command that loads and runs a model ends with: -q/--quiet, the sampling and engine groups, and `func`."""
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    add_sampling_options(p)
    add_engine_options(p)
    p.set_defaults(func=func)


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags that were given, each checked here so that a bad value names its flag
    (the checks, and the words for what each accepts, are SamplingParams')."""
    from ..sampling import RANGES, SamplingParams

    given = {name: getattr(args, name) for name in RANGES}
    for name, value in given.items():
        if value is None:
            continue
        try:
            SamplingParams().updated(**{name: value})
        except (LocalGLMError, ValueError, OverflowError):
            typed = repr(value).removesuffix(".0") if isinstance(value, float) else value  # `--top-p 7`, not 7.0
            raise LocalGLMError(f"--{name.replace('_', '-')} {typed}: out of range ({RANGES[name]})") from None
    return given


def size_flag(text: str, flag: str, *, positive: bool = False) -> int:
    """A size flag's value in bytes ('256M', '2GiB', '1.5G', a byte count), one-line error naming the flag."""
    n = parse_size(text, flag)
    assert n is not None
    if positive and n <= 0:
        raise LocalGLMError(f"{flag} {text}: must be more than 0 bytes")
    return n


def add_cache_ram_option(p: argparse.ArgumentParser) -> None:
    """`--cache-ram SIZE`: serve's and chat's RAM for conversations set aside (localglm/prompt_cache.py)."""
    p.add_argument(
        "--cache-ram", default=None, metavar="SIZE",
        help="RAM for the KV caches of conversations set aside while another takes a turn (an agent's subagents and side "
        "requests; chats you switch between), each restored when its conversation comes back instead of prefilled "
        "again; e.g. 8GiB, 0 to turn off (default: 4 GiB or an eighth of the RAM available after loading, the less)",
    )  # fmt: skip


def cache_ram_flag(args: argparse.Namespace) -> int | None:
    """--cache-ram in bytes, None when not given (the default budget)."""
    return None if args.cache_ram is None else size_flag(args.cache_ram, "--cache-ram")


def add_cache_disk_options(p: argparse.ArgumentParser, what: str) -> None:
    """`--cache-dir DIR` and `--cache-disk SIZE`: serve's and chat's saved prompts on disk (localglm/prompt_disk.py);
    `what` names the caches kept ("conversations'", "chats'")."""
    p.add_argument(
        "--cache-dir", default=None, metavar="DIR",
        help=f"also keep {what} KV caches on disk under DIR: what --cache-ram lets go, one whose unsaved tokens took "
        "30 s or more to compute at once (a crash keeps it), and all of them at exit, so after a restart a long prompt "
        "is read back instead of prefilled again (default: off; files are per model and load setup; two processes "
        "may share DIR)",
    )
    p.add_argument(
        "--cache-disk", default=None, metavar="SIZE",
        help="the most disk --cache-dir's files take, oldest deleted first, e.g. 64GiB "
        "(default: 32 GiB or half the disk's free space, the less)",
    )  # fmt: skip


def cache_disk_flags(args: argparse.Namespace) -> tuple[Path | None, int | None]:
    """(--cache-dir, --cache-disk in bytes), checked before the model loads (minutes, at GLM sizes): the directory
    made where missing and writable."""
    if args.cache_disk is not None and args.cache_dir is None:
        raise LocalGLMError("--cache-disk: give --cache-dir DIR too (where the files go)")
    disk = None if args.cache_disk is None else size_flag(args.cache_disk, "--cache-disk", positive=True)
    if args.cache_dir is None:
        return None, disk
    if not args.cache_dir.strip():
        raise LocalGLMError("--cache-dir: give a directory (an empty path would mean the current one)")
    path = Path(args.cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalGLMError(f"--cache-dir {path}: cannot make the directory ({exc.strerror or exc})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise LocalGLMError(f"--cache-dir {path}: not a directory this user can write")
    return path, disk
