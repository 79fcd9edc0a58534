"""Chat-template rendering that matches transformers byte for byte.

Real checkpoints ship their own Jinja chat template, and the model was trained on exactly what
transformers renders from it. So we do not re-implement the GLM format in Python: we render the
shipped template in the same sandboxed Jinja environment transformers builds
(`transformers.utils.chat_template_utils._cached_compile_jinja_template`) and feed it the same
variables `PreTrainedTokenizerBase.apply_chat_template` does (messages with `None` fields dropped,
reasoning fields aliased, special tokens as `bos_token`/`eos_token`/..., `documents=None`). Any
difference in a single whitespace byte would change the prompt tokens and degrade the model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from contextlib import suppress
from datetime import datetime
from importlib import resources
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from ..errors import TokenizerError
from .template_box import BoxedEnvironment, RenderLimits, RenderTimeout, TemplateLimitError, join_boxed, time_box

Message = dict[str, Any]

# Names a message's reasoning may arrive under; the first is the one chat templates read.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
BUILTIN_TEMPLATES = ("glm45", "glm47")

# Exceptions a template (or the data it was given) can raise while rendering.
_RENDER_ERRORS = (
    jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError,
    RecursionError, MemoryError, TemplateLimitError,
)  # fmt: skip


def builtin_template(style: str) -> str:
    """Source of one of the templates shipped with localglm ("glm45" or "glm47")."""
    if style not in BUILTIN_TEMPLATES:
        raise TokenizerError(f"unknown chat template style {style!r}: expected one of {', '.join(BUILTIN_TEMPLATES)}")
    return resources.files("localglm.chat").joinpath("templates", f"{style}.jinja").read_text(encoding="utf-8")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used for assistant masks) and render its body.

    transformers registers an extension for this tag; without one such templates fail to compile.
    """

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that, like transformers', refuses underscore attributes (sandbox hardening)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _TemplateDict:
    """`dict()` global without attribute access to the real type (as transformers exposes it)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers overrides Jinja's tojson: no HTML escaping, and these options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_environment(limits: RenderLimits) -> BoxedEnvironment:
    """A fresh environment configured exactly like transformers' chat-template environment, inside the
    time and memory box (template_box.py)."""
    env = BoxedEnvironment(
        limits, trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    env.box_filters()
    return env


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def plain_template_data(value: Any) -> Any:
    """Rebuild `value` from plain JSON types, as transformers does before a template sees it.

    Templates are untrusted code; rich objects (arrays, images, pydantic models) carry methods the
    sandbox cannot vet, so they become plain data or an inert "<TypeName>" placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(item) for item in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) and getattr(value, "ndim", 1) == 0:
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def alias_reasoning_fields(messages: list[Message]) -> list[Message]:
    """Fill `reasoning_content` (and `thinking`) from whichever reasoning field a message carries.

    Clients send a turn's reasoning as `reasoning_content`, `thinking` or `reasoning`; templates read
    `reasoning_content`. Mirrors transformers' `_alias_reasoning_fields`, key order included.
    """
    aliased = []
    for message in messages:
        if isinstance(message, dict):
            reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def parse_string_tool_arguments(messages: list[Message]) -> list[Message]:
    """Copy of `messages` where tool-call arguments sent as JSON text (OpenAI style) become objects.

    GLM templates iterate `arguments.items()`; the OpenAI API transmits arguments as a JSON string.
    Non-JSON or non-object strings raise, naming the call, since the template cannot render them.
    """
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not calls:
            out.append(message)
            continue
        new_calls = []
        for call in calls:
            fn = call.get("function", call) if isinstance(call, dict) else call
            args = fn.get("arguments") if isinstance(fn, dict) else None
            if isinstance(args, str):
                try:
                    parsed = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as exc:
                    raise TokenizerError(
                        f"tool call {fn.get('name')!r}: arguments are not valid JSON ({exc.msg})"
                    ) from None
                if not isinstance(parsed, dict):
                    raise TokenizerError(f"tool call {fn.get('name')!r}: arguments must be a JSON object")
                fn = {**fn, "arguments": parsed}
                call = {**call, "function": fn} if "function" in call else fn
            new_calls.append(call)
        out.append({**message, "tool_calls": new_calls})
    return out


class ChatTemplate:
    """One chat template, compiled once, rendered many times."""

    def __init__(self, source: str, name: str = "chat template", limits: RenderLimits = RenderLimits()) -> None:
        self.source = source
        self.name = name
        self.limits = limits
        try:
            self._compiled = _make_environment(limits).from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(
                f"{name}: Jinja syntax error at line {exc.lineno}: {_one_line(exc.message or '')}"
            ) from None
        except RecursionError:
            raise TokenizerError(f"{name}: the template is nested too deeply to compile") from None

    def render(
        self,
        messages: list[Message],
        *,
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        special_tokens: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` exactly as transformers' `apply_chat_template(..., tokenize=False)` would.

        `enable_thinking=None` leaves the variable undefined (the template's default), as not
        passing it to transformers does. `special_tokens` are the tokenizer's named special tokens
        (`eos_token` ...); `extra` template variables override them, as in transformers.
        """
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TokenizerError(f"{self.name}: messages must be a non-empty list of dicts")
        chat = []
        for message in messages:
            message = plain_template_data(message)
            if not isinstance(message, dict):
                raise TokenizerError(f"{self.name}: each message must be a dict, got {type(message).__name__}")
            chat.append({k: v for k, v in message.items() if v is not None})
        chat = alias_reasoning_fields(chat)
        if tools is not None:
            for tool in tools:
                if not isinstance(tool, dict):
                    raise TokenizerError(
                        f"{self.name}: each tool must be a JSON-schema dict, got {type(tool).__name__}"
                    )
        if enable_thinking is not None:
            extra["enable_thinking"] = enable_thinking
        variables = plain_template_data({**(special_tokens or {}), **extra})
        try:
            with time_box(self.limits.seconds):
                pieces = self._compiled.generate(
                    messages=chat,
                    tools=plain_template_data(tools),
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                    **variables,
                )
                return join_boxed(pieces, self.limits)
        except RenderTimeout:
            raise TokenizerError(
                f"{self.name}: rendering took longer than {self.limits.seconds:g} s: the template loops too long"
            ) from None
        except RecursionError:
            raise TokenizerError(f"{self.name}: rendering failed: the template recurses too deeply") from None
        except _RENDER_ERRORS as exc:
            raise TokenizerError(f"{self.name}: rendering failed: {_one_line(str(exc)) or type(exc).__name__}") from exc


def render_chat_template(
    template: str | ChatTemplate,
    messages: list[Message],
    *,
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    special_tokens: dict | None = None,
    **extra: Any,
) -> str:
    """Render a chat template (source text or a compiled `ChatTemplate`) as transformers would.

    Pass a `ChatTemplate` to reuse its compilation; a string is compiled for this call only.
    """
    compiled = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
    return compiled.render(
        messages,
        tools=tools,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=enable_thinking,
        special_tokens=special_tokens,
        **extra,
    )


def detect_format(template: ChatTemplate) -> str:
    """Format family of a template: "glm47" if generation opens with <think> / calls have no newlines.

    Rendering a probe is more reliable than reading the template text, which varies by release;
    the text heuristic is the fallback for templates that refuse the probe.
    """
    probe = [{"role": "user", "content": "hi"}]
    with suppress(TokenizerError):
        if template.render(probe, add_generation_prompt=True).rstrip().endswith("<think>"):
            return "glm47"
        call = {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": "b"}}}],
        }
        rendered = template.render([*probe, call], add_generation_prompt=False)
        if "<tool_call>f<arg_key>" in rendered:
            return "glm47"
        if "<tool_call>f\n" in rendered:
            return "glm45"
    source = template.source
    if "\\n<arg_key>" in source or "\n<arg_key>" in source:
        return "glm45"
    return "glm47" if "<arg_key>" in source else "glm45"
