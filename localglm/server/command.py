"""`localglm serve [MODEL]`: the OpenAI-, Anthropic- and Ollama-compatible HTTP server."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import LocalGLMError

API_KEY_ENV = "LOCALGLM_API_KEY"


def register(sub: Any) -> None:
    from ..cli import add_model_run_options
    from ..commands.flags import MODEL_OR_DEFAULT_HELP, add_cache_disk_options, add_cache_ram_option

    p = sub.add_parser(
        "serve",
        help="serve the model over OpenAI-, Anthropic- and Ollama-compatible HTTP APIs",
        description=(
            "Serve one model for coding agents and editors: /v1/chat/completions, /v1/completions, /v1/models "
            "(OpenAI), /v1/responses (OpenAI's Responses API: Codex CLI), /api/chat, /api/generate, /api/tags, /api/show "
            "(Ollama's API: run with --port 11434 for editors set up for Ollama), /v1/messages and /v1/messages/count_tokens (Anthropic), /health and /metrics. "
            "Requests run one at a time from a FIFO queue; the KV cache of the previous request is reused "
            "for the longest common prefix, so an agent's next turn only prefills what is new, and the caches of "
            "conversations that take turns are set aside in RAM (--cache-ram) and restored when they come back; with "
            "--cache-dir they are also kept on disk, across restarts."
        ),
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_OR_DEFAULT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument(
        "--api-key", default=None,
        help=f"require this key (Authorization: Bearer KEY or x-api-key: KEY); other users see it in `ps`, so prefer "
        f"--api-key-file or the {API_KEY_ENV} environment variable",
    )  # fmt: skip
    p.add_argument("--api-key-file", default=None, metavar="PATH", help="require the key on the first line of PATH")
    p.add_argument("--model-name", default=None, help="model id reported by /v1/models (default: the model directory's name)")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait while one runs; more get 503 (default 16)")
    p.add_argument("--no-think", action="store_true", help="turn thinking off by default (a request may still turn it on)")
    p.add_argument("--keep-thinking", action="store_true",
                   help="keep the reasoning of earlier turns in the prompt (GLM-4.7 / GLM-5.x 'preserved thinking', as Z.ai's coding "
                        "endpoint does; their templates drop it by default); a request may still choose with clear_thinking")
    p.add_argument("--no-prefix-reuse", action="store_true", help="recompute every prompt from scratch (for comparisons)")
    add_cache_ram_option(p)
    add_cache_disk_options(p, "conversations'")
    p.add_argument(
        "--no-tool-grammar", action="store_true",
        help="do not hold tool calls to GLM's format while decoding (for comparisons); tool_choice 'required', a "
        "named tool and a custom tool's input grammar (format) are still enforced, by the grammar",
    )  # fmt: skip
    p.add_argument(
        "--parse-special-tokens", action="store_true",
        help="let special-token text in user, system and tool messages (e.g. '<|assistant|>') become special tokens, "
        "as transformers does; by default it stays text, so message content cannot forge turns",
    )  # fmt: skip
    g = p.add_argument_group("limits (what one client may cost)")
    g.add_argument("--max-body", default=None, metavar="SIZE", help="request body cap, e.g. 16MiB (default: 4 MiB, or 16 bytes per --ctx token if more)")
    g.add_argument("--body-timeout", type=float, default=30.0, metavar="S", help="a request body must arrive within S seconds (default 30)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="S", help="request headers must arrive within S seconds (default 10)")
    g.add_argument("--max-connections", type=int, default=128, metavar="N", help="requests beyond N open connections get 503 (default 128)")
    g.add_argument(
        "--allow-host", action="append", default=[], metavar="NAME",
        help="also accept requests whose Host header is NAME (repeatable; '*' accepts any). Localhost names and IP "
        "addresses are always accepted; other names are refused against DNS rebinding",
    )  # fmt: skip
    add_model_run_options(p, cmd_serve, quiet_help="no progress bar while loading, no access log")


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise LocalGLMError(f"--port must be between 1 and 65535, got {args.port}")
    if args.queue_size < 0:
        raise LocalGLMError(f"--queue-size must be at least 0, got {args.queue_size}")
    if args.api_key is not None and not args.api_key.strip():
        raise LocalGLMError("--api-key must not be empty")
    for flag in ("body_timeout", "header_timeout"):
        value = getattr(args, flag)
        if not value > 0 or value == float("inf"):
            raise LocalGLMError(f"--{flag.replace('_', '-')} must be a positive number of seconds, got {value}")
    if args.max_connections < 1:
        raise LocalGLMError(f"--max-connections must be at least 1, got {args.max_connections}")


def api_key(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> str | None:
    """The key to require: --api-key, else the first line of --api-key-file, else $LOCALGLM_API_KEY."""
    if args.api_key is not None and args.api_key_file is not None:
        raise LocalGLMError("give --api-key or --api-key-file, not both")
    if args.api_key is not None:
        return args.api_key.strip()
    if args.api_key_file is not None:
        path = Path(args.api_key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LocalGLMError(f"--api-key-file {path}: cannot read it ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise LocalGLMError(f"--api-key-file {path}: the first line is empty")
        return key
    key = environ.get(API_KEY_ENV, "").strip()
    return key or None


def _max_body(args: argparse.Namespace) -> int | None:
    if args.max_body is None:
        return None
    from ..commands.flags import size_flag

    size = size_flag(args.max_body, "--max-body")
    if size < 1024:
        raise LocalGLMError(f"--max-body must be at least 1KiB, got {args.max_body}")
    return size


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    """--allow-host names, plus --host when it is a name (a server bound to a name is reached by it)."""
    bound = [] if _is_ip(args.host) else [args.host]
    return tuple(dict.fromkeys([*args.allow_host, *bound]))


def _saved_prompts_line(model: Any) -> str:
    """The startup line about conversations set aside (prompt_cache.py): their RAM, or that it is off."""
    from ..model_info import human_bytes

    store = model.prompt_cache
    if store is None:
        return "conversations taking turns: not set aside (--cache-ram 0 or --no-prefix-reuse)"
    line = f"conversations taking turns: set aside in up to {human_bytes(store.budget)} of RAM (--cache-ram)"
    disk = store.disk
    if disk is not None:
        line += (
            f" and {human_bytes(disk.budget)} of disk in {disk.dir} (--cache-dir, --cache-disk); "
            f"{len(disk.entries)} saved there before ({human_bytes(disk.nbytes)})"
        )  # fmt: skip
    return line


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..commands.flags import cache_disk_flags, cache_ram_flag
    from ..default_model import default_model_path

    _check_args(args)
    key = api_key(args)
    max_body = _max_body(args)
    cache_ram = cache_ram_flag(args)
    if args.cache_dir is not None and args.no_prefix_reuse:
        raise LocalGLMError("--cache-dir: nothing is reused with --no-prefix-reuse, so nothing would be kept; drop one of them")
    cache_dir, cache_disk = cache_disk_flags(args)
    if args.model is None:
        args.model = str(default_model_path())
    sock = _listen(args.host, args.port)  # a taken port or a bad --host fails now, not after loading the model
    try:
        return _serve(args, sock, key, max_body, cache_ram, cache_dir, cache_disk)
    finally:
        sock.close()


def _serve(args: argparse.Namespace, sock: socket.socket, key: str | None, max_body: int | None, cache_ram: int | None,
           cache_dir: Path | None, cache_disk: int | None) -> int:
    """Load the model, then serve it on the bound socket until stopped."""
    from ..cli import open_model, sampling_overrides
    from .app import create_app
    from .http import build_server
    from .state import ServerSettings

    model = open_model(args)
    settings = ServerSettings(
        model_name=args.model_name or model.path.name,
        api_key=key,
        queue_size=args.queue_size,
        enable_thinking=False if args.no_think else None,
        clear_thinking=False if args.keep_thinking else None,
        reuse_prefix=not args.no_prefix_reuse,
        cache_ram_bytes=cache_ram,
        cache_dir=cache_dir,
        cache_disk_bytes=cache_disk,
        sampling=model.default_sampling.updated(**sampling_overrides(args)),
        max_body_bytes=max_body,
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
        max_connections=args.max_connections,
        allowed_hosts=_allowed_hosts(args),
        parse_special_tokens=args.parse_special_tokens,
        tool_grammar=not args.no_tool_grammar,
    )
    app = create_app(model, settings)
    if not _is_loopback(args.host) and not key:
        print(f"localglm: warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    base = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(
        f"localglm: serving {settings.model_name} (ctx {model.ctx}) at {base}\n"
        f"  OpenAI:    {base}/v1  (chat/completions, completions, models)\n"
        f"  Anthropic: {base}     (ANTHROPIC_BASE_URL; /v1/messages)\n"
        f"  health:    {base}/health   metrics: {base}/metrics\n"
        f"  {_saved_prompts_line(model)}",
        file=sys.stderr,
    )
    server = build_server(
        app,
        host=args.host,
        port=args.port,
        log_level="warning" if args.quiet else "info",
        access_log=not args.quiet,
        timeout_graceful_shutdown=5,
    )
    try:
        server.run(sockets=[sock])  # Ctrl+C: uvicorn stops (the app's shutdown writes --cache-dir), then re-raises it
    finally:
        disk = model.prompt_cache.disk if model.prompt_cache is not None else None
        if disk is not None and server.started:
            print(f"localglm: {disk.describe()} for the next start", file=sys.stderr)
    if not server.started:
        raise LocalGLMError(f"the server on {args.host}:{args.port} did not start (see the messages above)")
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so a taken port is a one-line error, not uvicorn's exit."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise LocalGLMError(f"--host {host!r}: cannot resolve it ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise LocalGLMError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
