"""The `localglm` command line: generate, inspect, make-tiny, and the commands of other modules.

User mistakes end as one line on stderr (`localglm: error: ...`) and exit status 2; so do the
environment's refusals (a full or read-only disk: an OSError). Only bugs show a traceback. Commands that live with their feature (chat, serve, quantize, ...) are modules
listed in EXTRA_COMMANDS, each with `register(subparsers)` adding its parser and `func` default.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .commands.flags import MODEL_OR_DEFAULT_HELP, add_engine_options, add_model_run_options, add_sampling_options, device_for, load_options, sampling_overrides, set_threads
from .commands.progress import progress
from .errors import LocalGLMError

EPILOG = "Run `localglm COMMAND --help` for a command's options."

# Modules that add a subcommand: each defines `register(sub: argparse._SubParsersAction) -> None`.
EXTRA_COMMANDS: tuple[str, ...] = ("tui.command", "localglm.server.command", "localglm.commands.export_gguf", "localglm.commands.simulate", "localglm.commands.plan", "localglm.commands.quantize", "localglm.commands.eval")


def open_model(args: argparse.Namespace) -> Any:
    """Load the model the command's flags describe, with load progress on stderr unless -q."""
    from .loader import load

    set_threads(args.threads)
    opts = load_options(args)
    model = getattr(args, "model", None)
    if model is None:  # no MODEL given: the default model shipped inside the package
        from .default_model import default_model_path

        model = default_model_path()
    with progress("loading", quiet=getattr(args, "quiet", False)) as update:
        tick = (lambda stage, done, total: update(done, total, stage)) if update else None
        loaded = load(model, device=device_for(args), dtype=args.dtype, ctx=args.ctx, progress=tick, **opts)
    _warn_unused_draft_flags(args, loaded)
    return loaded


def _warn_unused_draft_flags(args: argparse.Namespace, model: Any) -> None:
    """Drafting flags on a model loaded without an MTP layer change nothing: say so rather than ignore them."""
    given = [flag for flag, value in (("--draft", getattr(args, "draft", None)), ("--draft-vocab", getattr(args, "draft_vocab", None)))
             if value not in (None, 0)] + (["--draft-fixed"] if getattr(args, "draft_fixed", False) else [])  # fmt: skip
    if given and model.speculation is None:
        why = "--no-mtp leaves the MTP layer out" if getattr(args, "mtp", None) is False else "the model has no MTP layer loaded to draft with"
        print(f"localglm: warning: {', '.join(given)}: {why}; decoding without drafts", file=sys.stderr)


def valid_text(value: str, what: str) -> str:
    """A command-line string with its undecodable bytes (which Python keeps as lone surrogates) as
    U+FFFD, with a warning: the tokenizer cannot take them as they are."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        print(f"localglm: warning: {what} is not valid UTF-8; invalid bytes were replaced with U+FFFD", file=sys.stderr)
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def read_stdin_text() -> str:
    """All of stdin as UTF-8 text, invalid bytes as U+FFFD (with a warning)."""
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        print("localglm: warning: stdin is not valid UTF-8; invalid bytes were replaced with U+FFFD", file=sys.stderr)
        return raw.decode("utf-8", "replace")


# ---- commands ----------------------------------------------------------------------------------
def json_response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """--json / --json-schema FILE as an OpenAI response_format (the schema file is read and checked here)."""
    if args.json_schema is None:
        return {"type": "json_object"} if args.json else None
    path = Path(args.json_schema)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LocalGLMError(f"--json-schema: cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LocalGLMError(f"--json-schema: {path} is not a JSON file ({exc})") from None
    if not isinstance(schema, dict):
        raise LocalGLMError(f"--json-schema: {path} must hold a JSON schema object")
    return {"type": "json_schema", "json_schema": {"name": path.stem, "schema": schema}}


def _name_schema_file(events: Any, args: argparse.Namespace) -> Any:
    """`events`, with a schema the grammar engine refuses reported against --json-schema's file
    (it is compiled when generation starts, before any output)."""
    from .grammar import GrammarError

    try:
        yield from events
    except GrammarError as exc:
        raise LocalGLMError(f"--json-schema {args.json_schema}: {exc}") from None


def generate_prompt(args: argparse.Namespace) -> str:
    """generate's prompt: PROMPT after MODEL or -p (once), - for stdin; the error for none says how to give one,
    and names a lone MODEL that is no path (someone's prompt taken for a model directory)."""
    if args.text is not None and args.prompt is not None:
        raise LocalGLMError("generate: give the prompt once, as PROMPT after MODEL or with -p, not both")
    given = args.text if args.text is not None else args.prompt
    if given is not None:
        return read_stdin_text() if given == "-" else given
    if args.model is not None and not Path(args.model).expanduser().exists():
        raise LocalGLMError(f"generate: no prompt given, and {args.model!r} is no model directory or file; "
                            f"with the packaged model: localglm generate -p {shlex.quote(args.model)}")  # fmt: skip
    raise LocalGLMError('generate: give a prompt: localglm generate [MODEL] "TEXT", or -p TEXT (- reads stdin)')


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine import Done
    from .chat.stream_parser import ContentDelta, ThinkingDelta, ToolCallEnd

    prompt = generate_prompt(args)
    prompt = valid_text(prompt, "the prompt")
    args.system = valid_text(args.system, "--system") if args.system is not None else None
    args.stop = [valid_text(s, "--stop") for s in args.stop] if args.stop else args.stop
    if args.max_new_tokens < 1:
        raise LocalGLMError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling = sampling_overrides(args)  # a bad flag fails before the model loads
    response_format = json_response_format(args)
    model = open_model(args)
    kwargs: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, stop=args.stop or (), ignore_eos=args.ignore_eos, **sampling)
    if response_format is not None:
        kwargs["response_format"] = response_format
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        events = model.generate(messages=messages, enable_thinking=not args.no_think, **kwargs)
    else:
        events = model.generate(prompt, **kwargs)
    events = _name_schema_file(events, args)
    out = sys.stdout
    in_thinking = False
    done = None
    last = "\n"  # the last character written: the completion ends with exactly one newline

    def write(text: str) -> None:
        nonlocal last
        if text:
            out.write(text)
            last = text[-1]

    for ev in events:
        if isinstance(ev, ThinkingDelta):
            if not in_thinking:
                write("<think>")
                in_thinking = True
            write(ev.text)
        elif isinstance(ev, ContentDelta):
            if in_thinking:
                write("</think>\n")
                in_thinking = False
            write(ev.text)
        elif isinstance(ev, ToolCallEnd):
            write(("" if last == "\n" else "\n") + f"[tool call] {ev.call.name} {ev.call.arguments_json}\n")
        elif isinstance(ev, Done):
            done = ev
        out.flush()
    if in_thinking:
        write("</think>")
    if last != "\n":
        write("\n")
    out.flush()
    assert done is not None
    stats = done.stats
    # The stats line is about the run, not part of the completion: stderr, so `> out.txt` holds only the text.
    print(f"[{done.finish_reason}] {stats.summary_line()}", file=sys.stderr)
    if args.stats_json:
        keys = ("prompt_tokens", "prompt_tok_s", "decode_tokens", "decode_tok_s", "ttft_s", "peak_rss_bytes")
        d = stats.to_dict()
        extra = {"backend": d["backend"]} if d["backend"] else {}  # expert kernels / offload counters
        if d["draft_depths"]:  # speculative decoding with the MTP head: drafted, accepted, depths chosen
            extra |= {k: d[k] for k in ("draft_tokens", "accepted_tokens", "acceptance_length", "draft_depths")}
        print(json.dumps({k: d[k] for k in keys} | {"finish_reason": done.finish_reason} | extra, default=str))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .model_info import check_ctx, default_ctx, describe, human_bytes, read_checkpoint

    info = read_checkpoint(args.model)
    ctx = args.ctx if args.ctx is not None else default_ctx(info.config)
    check_ctx(info.config, ctx, str(args.model))
    print(describe(info.config, ctx=ctx))
    if info.stored is not None:
        print(f"stored            {info.stored.label}")
    if info.disk_bytes:
        print(f"on disk           {human_bytes(info.disk_bytes)} ({info.kind})")
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
    g.add_argument("model", nargs="?", default=None, help=MODEL_OR_DEFAULT_HELP)
    g.add_argument("text", nargs="?", default=None, metavar="PROMPT", help="prompt text after MODEL (as ollama run takes it), or - to read stdin; or give it with -p")
    g.add_argument("-p", "--prompt", default=None, help="prompt text, or - to read it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    g.add_argument("--system", default=None, help="system prompt (with --chat)")
    g.add_argument("--no-think", action="store_true", help="with --chat: turn the model's thinking off")
    g.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")
    g.add_argument("--stats-json", action="store_true", help="print the stats as one JSON object on the last line of stdout")
    g.add_argument("--json", action="store_true", help="constrain the output to one JSON object (after the thinking block, with --chat)")
    g.add_argument("--json-schema", default=None, metavar="FILE", help="constrain the output to JSON valid for the JSON schema in FILE")
    add_model_run_options(g, cmd_generate)

    i = sub.add_parser(
        "inspect", help="show architecture, parameter counts and memory needs",
        description="Reads config.json (of a Hugging Face or localglm quantized directory) or a GGUF's metadata, and the "
        "headers of the weight files for the precision they are stored in; no weights are loaded.",
    )  # fmt: skip
    i.add_argument("model", help="model directory, config.json, or .gguf file")
    i.add_argument("--ctx", type=int, default=None, help="context size for the KV-cache estimate (default: as generate, min(4096, model max))")
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


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
    """Show a warning as `localglm: warning: ...` on one line (Python's default adds the source file and line)."""
    print(f"localglm: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:  # answered before the parser imports every command
        from . import __version__

        print(f"localglm {__version__}")
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except (LocalGLMError, NotImplementedError) as exc:
        print(f"localglm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(("\n" if sys.stderr.isatty() else "") + "localglm: interrupted", file=sys.stderr)  # a terminal may be mid-line
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the environment said no (full or read-only disk, permissions): not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"localglm: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
