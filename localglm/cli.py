"""The `localglm` command line: generate, inspect, make-tiny, and the commands of other modules.

User mistakes end as one line on stderr (`localglm: error: ...`) and exit status 2; only bugs
show a traceback. Commands that live with their feature (chat, serve, quantize, ...) are modules
listed in EXTRA_COMMANDS, each with `register(subparsers)` adding its parser and `func` default.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .commands.flags import add_engine_options, add_model_run_options, add_sampling_options, device_for, load_options, sampling_overrides
from .errors import LocalGLMError

EPILOG = "Run `localglm COMMAND --help` for a command's options."

# Modules that add a subcommand: each defines `register(sub: argparse._SubParsersAction) -> None`.
EXTRA_COMMANDS: tuple[str, ...] = ("tui.command", "localglm.server.command", "localglm.commands.export_gguf", "localglm.commands.simulate", "localglm.commands.plan", "localglm.commands.quantize", "localglm.commands.eval")


def load_progress(quiet: bool) -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    """A progress callback for `localglm.load` drawing a bar on stderr, and its closer."""
    if quiet:
        return None, lambda: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("loading {task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), transient=True,
    )
    tasks: dict[str, Any] = {}
    bar.start()

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    return update, bar.stop


def open_model(args: argparse.Namespace) -> Any:
    import torch

    from .loader import load

    if args.threads is not None:
        if args.threads < 1:
            raise LocalGLMError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    progress, close = load_progress(getattr(args, "quiet", False))
    try:
        model = getattr(args, "model", None)
        if model is None:  # no MODEL given: the default model shipped inside the package
            from .default_model import default_model_path

            model = default_model_path()
        return load(model, device=device_for(args), dtype=args.dtype, ctx=args.ctx, progress=progress, **load_options(args))
    finally:
        close()


# ---- commands ----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Done
    from .chat.stream_parser import ContentDelta, ThinkingDelta, ToolCallEnd

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if prompt is None:
        raise LocalGLMError("generate: give a prompt with -p TEXT (or -p - to read stdin)")
    if args.max_new_tokens < 1:
        raise LocalGLMError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = open_model(args)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens, stop=args.stop or (), ignore_eos=args.ignore_eos, **sampling_overrides(args)
    )
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        events = model.generate(messages=messages, enable_thinking=not args.no_think, **kwargs)
    else:
        events = model.generate(prompt, **kwargs)
    out = sys.stdout
    in_thinking = False
    done = None
    for ev in events:
        if isinstance(ev, ThinkingDelta):
            if not in_thinking:
                out.write("<think>")
                in_thinking = True
            out.write(ev.text)
        elif isinstance(ev, ContentDelta):
            if in_thinking:
                out.write("</think>\n")
                in_thinking = False
            out.write(ev.text)
        elif isinstance(ev, ToolCallEnd):
            out.write(f"\n[tool call] {ev.call.name} {ev.call.arguments_json}\n")
        elif isinstance(ev, Done):
            done = ev
        out.flush()
    if in_thinking:
        out.write("</think>")
    out.write("\n")
    assert done is not None
    stats = done.stats
    line = f"[{done.finish_reason}] {stats.summary_line()}"
    if args.stats_json:
        print(line, file=sys.stderr)
        keys = ("prompt_tokens", "prompt_tok_s", "decode_tokens", "decode_tok_s", "ttft_s", "peak_rss_bytes")
        d = stats.to_dict()
        extra = {"backend": d["backend"]} if d["backend"] else {}  # expert kernels / offload counters
        print(json.dumps({k: d[k] for k in keys} | {"finish_reason": done.finish_reason} | extra, default=str))
    else:
        print(line)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .model_info import describe

    cfg = ModelConfig.from_file(args.model)
    print(describe(cfg, ctx=args.ctx))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from .models import ARCHITECTURES
    from .tiny import make_tiny

    spec_cls = ARCHITECTURES[args.arch].tiny.spec
    own = set(spec_cls.field_names())
    given = {k: v for k, v in vars(args).items() if k.startswith("tiny_") and v is not None}
    foreign = sorted("--" + k[len("tiny_") :].replace("_", "-") for k in given if k[len("tiny_") :] not in own)
    if foreign:
        raise LocalGLMError(f"make-tiny --arch {args.arch}: {', '.join(foreign)} belong to another architecture")
    spec = spec_cls(**{k[len("tiny_") :]: v for k, v in given.items()})
    out = make_tiny(args.out, spec, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


# ---- parser ------------------------------------------------------------------------------------
def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .models import ARCHITECTURES

    parser = argparse.ArgumentParser(
        prog="localglm",
        description="Run GLM-family mixture-of-experts models on your own machine: "
        + "; ".join(a.title for a in ARCHITECTURES.values()) + ".",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"localglm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt", description="Stream a completion (or, with --chat, a chat reply) and print one stats line.")
    g.add_argument("model", nargs="?", default=None, help="model directory (Hugging Face layout: config.json, *.safetensors, tokenizer.json); default: the packaged default model")
    g.add_argument("-p", "--prompt", default=None, help="prompt text, or - to read it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    g.add_argument("--system", default=None, help="system prompt (with --chat)")
    g.add_argument("--no-think", action="store_true", help="with --chat: turn the model's thinking off")
    g.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")
    g.add_argument("--stats-json", action="store_true", help="print the stats as one JSON object on the last line of stdout")
    add_model_run_options(g, cmd_generate)

    i = sub.add_parser("inspect", help="show architecture, parameter counts and memory needs", description="Reads config.json only; no weights are loaded.")
    i.add_argument("model", help="model directory or config.json")
    i.add_argument("--ctx", type=int, default=4096, help="context size for the KV-cache estimate (default 4096)")
    i.set_defaults(func=cmd_inspect)

    from .models import ARCHITECTURES

    t = sub.add_parser(
        "make-tiny",
        help="write a random GLM checkpoint (any supported architecture) for tests and benchmarks",
        description="Writes sharded safetensors + index, config.json, a BPE tokenizer with GLM's special tokens and the chat template. "
        "Every shape knob of the chosen architecture is a flag; unset ones take the architecture's small defaults.",
    )
    t.add_argument("out", help="output directory")
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    t.add_argument("--arch", choices=list(ARCHITECTURES), default="glm4_moe", help="model_type to write (default: glm4_moe)")
    knobs: dict[str, dict[str, object]] = {}  # flag -> {arch: default}
    for arch in ARCHITECTURES.values():
        for name, default in arch.tiny.spec().__dict__.items():
            knobs.setdefault(name, {})[arch.model_type] = default
    for name, defaults in knobs.items():
        first = next(iter(defaults.values()))
        kind = type(first) if first is not None else int
        conv = _bool if kind is bool else kind
        shown = ", ".join(f"{a}: {d}" for a, d in defaults.items()) if len(set(map(str, defaults.values()))) > 1 or len(defaults) < len(ARCHITECTURES) else str(first)
        t.add_argument("--" + name.replace("_", "-"), dest="tiny_" + name, type=conv, default=None, help=f"(default: {shown})")
    t.set_defaults(func=cmd_make_tiny)

    import importlib

    for module in EXTRA_COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (LocalGLMError, NotImplementedError) as exc:
        print(f"localglm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlocalglm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
