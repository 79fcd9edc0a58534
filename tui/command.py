"""`localglm chat`: the command-line entry of the Textual chat app (registered via EXTRA_COMMANDS)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from localglm.cli import add_engine_options, add_sampling_options, device_for, load_options, sampling_overrides
from localglm.commands.flags import MODEL_OR_DEFAULT_HELP, add_cache_disk_options, add_cache_ram_option, cache_disk_flags, cache_ram_flag
from localglm.errors import LocalGLMError

DESCRIPTION = """\
Chat with a GLM model in the terminal: replies stream in as Markdown, the model's thinking
shows in a foldable block, and a side panel shows prefill/decode speed, time to first token,
context use, RAM/VRAM and (when experts are offloaded) the expert cache at work.

keys: Enter send · Shift+Enter or Ctrl+J new line · Esc stop · Ctrl+R regenerate ·
      Ctrl+T thinking on/off · Ctrl+N new chat · Ctrl+O saved chats · Ctrl+S system prompt ·
      Ctrl+B copy code block · Ctrl+F fold thinking · F2 stats panel ·
      F1 all keys · Ctrl+Q quit
"""

EPILOG = """\
Conversations are saved automatically as JSON under $XDG_DATA_HOME/localglm/conversations
(~/.local/share/localglm/conversations when XDG_DATA_HOME is unset)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in a terminal UI",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", default=None, help=MODEL_OR_DEFAULT_HELP)
    p.add_argument("--system", default="", metavar="TEXT", help="system prompt for new chats (edit it in the app with Ctrl+S)")
    p.add_argument("--no-think", action="store_true", help="start with the model's thinking turned off (Ctrl+T toggles it)")
    p.add_argument("--keep-thinking", action="store_true",
                   help="keep the reasoning of earlier replies in the prompt (GLM-4.7 / GLM-5.x 'preserved thinking'; their "
                        "templates drop it by default)")
    p.add_argument(
        "-n", "--max-new-tokens", type=int, default=None, help="tokens per reply at most (default: up to the context limit)"
    )
    add_cache_ram_option(p)
    add_cache_disk_options(p, "chats'")
    add_sampling_options(p)
    add_engine_options(p)
    p.set_defaults(func=cmd_chat)


def options_from_args(args: argparse.Namespace) -> Any:
    from .app import ChatOptions

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise LocalGLMError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.ctx is not None and args.ctx < 2:
        raise LocalGLMError(f"--ctx must be at least 2, got {args.ctx}")
    cache_dir, cache_disk = cache_disk_flags(args)
    return ChatOptions(
        model_path=args.model,
        device=device_for(args),
        load_options=load_options(args),
        dtype=args.dtype,
        ctx=args.ctx,
        threads=args.threads,
        sampling={k: v for k, v in sampling_overrides(args).items() if v is not None},
        system=args.system or "",
        thinking=not args.no_think,
        clear_thinking=False if args.keep_thinking else None,
        max_new_tokens=args.max_new_tokens,
        cache_ram=cache_ram_flag(args),
        cache_dir=cache_dir,
        cache_disk=cache_disk,
    )


def cmd_chat(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):  # piped, the app drew its screen and never exited
        raise LocalGLMError(
            "chat is an interactive terminal app and needs a terminal on stdin and stdout; for a prompt from a pipe use "
            "`localglm generate MODEL -p -`"
        )
    from .app import ChatApp

    app = ChatApp(options)
    app.run()
    kept = app.keep_chats()  # --cache-dir: the chats' caches for the next start
    if kept is not None:
        print(f"localglm: {kept}", file=sys.stderr)
    if app.error_message:
        # The error screen is gone with the app; leave the reason in the terminal too.
        print(f"localglm: error: {app.error_message}", file=sys.stderr)
        return 2
    return app.return_code or 0
