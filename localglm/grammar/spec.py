"""What a request constrains, written as one llguidance Lark grammar over the whole assistant output.

The output is: an optional thinking block (open already when the prompt ends in `<think>`), then
the body: JSON for `response_format`, free text and/or tool calls in GLM's XML format
(`<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>`, newlines between the
parts optional: GLM-4.5 writes them, GLM-4.7 does not). Tool names come from the request's tools;
each tool's arguments follow its schema's `properties` in their declared order (required ones
always, optional ones maybe), string values raw (as the chat template writes them), others as JSON
valid for the property's schema. Free text may not spell out a GLM tag (`<tool_call>` typed as
plain characters would still be parsed as a call by the stream parser), so a call can only begin
with the real tag.

A custom (free-form) tool is shown to the model as a function with one string argument, `input`;
when the client gives it a grammar (OpenAI's `format: {type: "grammar", syntax: "lark" | "regex",
definition}`, as Codex sends its apply_patch tool), that argument's text must match it. The
client's grammar is its own entry in llguidance's grammar list, referenced as `@name` from the
output grammar, so its rule names cannot clash with ours; OpenAI's own custom tools run the same
Lark dialect (llguidance's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..chat.stream_parser import is_string_schema
from ..errors import LocalGLMError
from .vocab import _llguidance

# GLM's tags and role markers, as text: free text and raw string values never spell one out.
_TAGS = r"<\/?(think|tool_call|arg_key|arg_value|tool_response)>|<\|[a-z_]+\|>"
_FREE = r"/(?s:.*)/ & ~/(?s:.*(" + _TAGS + r").*)/"
THINK_MODES = ("none", "optional", "open")  # no thinking block; the model may open one; the prompt opened it
CUSTOM_INPUT = "input"  # the one string argument a custom (free-form) tool is shown to the model with
INPUT_SYNTAXES = ("lark", "regex")


class GrammarError(LocalGLMError):
    """A response_format or tool schema the grammar engine cannot use; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_response_format(fmt: Any, path: str = "response_format") -> dict[str, Any] | None:
    """The JSON schema a response_format asks for (json_object: any object); None for text."""
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise GrammarError(f"{path}: expected a JSON object", path)
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, Mapping):
            raise GrammarError(f"{path}.json_schema: expected an object holding 'schema'", f"{path}.json_schema")
        schema = spec.get("schema", {})
        if isinstance(schema, bool) or not isinstance(schema, Mapping):
            raise GrammarError(f"{path}.json_schema.schema: expected a JSON schema object", f"{path}.json_schema.schema")
        if "strict" in spec and not isinstance(spec["strict"], bool):
            raise GrammarError(f"{path}.json_schema.strict: expected true or false", f"{path}.json_schema.strict")
        return dict(schema)  # strict or not, the schema is enforced
    raise GrammarError(f"{path}.type: {kind!r} is not one of text, json_object, json_schema", f"{path}.type")


MAX_DEFINITION_CHARS = 64 * 1024  # a custom tool's grammar (Codex's apply_patch: ~700); compiling is superlinear


@dataclass(frozen=True)
class InputGrammar:
    """What a custom tool's input text must match: a Lark grammar (llguidance's dialect) or a regex."""

    syntax: str  # one of INPUT_SYNTAXES
    definition: str
    param: str = "tools"  # the request field it came from, for errors

    def check(self) -> None:
        """Compile it alone: a GrammarError naming `param`'s definition where it does not compile (request_processor
        asks when the request's whole grammar did not, off the server's event loop: a large grammar takes seconds)."""
        top = json.dumps({"grammars": [self.entry("start")]})
        failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(top)
        if failed:
            first = (messages[0] if messages else "it does not compile").strip().splitlines()[0]
            where = f"{self.param}.definition"
            raise GrammarError(f"{where}: the {self.syntax} grammar does not compile: {first}", where)

    def unusable(self, why: str) -> GrammarError:
        """The 400 for a grammar that compiled but that generation cannot follow (`why`: llguidance's error line)."""
        where = f"{self.param}.definition"
        return GrammarError(f"{where}: the {self.syntax} grammar cannot be followed: {why}", where)

    def entry(self, name: str) -> dict[str, Any]:
        """This grammar as one entry of llguidance's top-level grammar list, referenced as `@name`."""
        if self.syntax == "regex":
            (entry,) = json.loads(_llguidance().LLMatcher.grammar_from_regex(self.definition))["grammars"]
        else:
            entry = {"lark_grammar": self.definition}
        return {**entry, "name": name}


def parse_input_format(fmt: Any, path: str) -> InputGrammar | None:
    """A custom tool's `format` (None: free text), in either OpenAI API's spelling: the Responses API's
    `{type: "grammar", syntax, definition}` or chat completions' `{type: "grammar", grammar: {syntax,
    definition}}`. Its shape is checked here; `InputGrammar.check` compiles it (request_processor does,
    before anything is generated)."""
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise GrammarError(f"{path}: expected a JSON object", path)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind != "grammar":
        raise GrammarError(f"{path}.type: {kind!r} is not one of text, grammar", f"{path}.type")
    where, spec = path, fmt
    if "grammar" in fmt:
        where, spec = f"{path}.grammar", fmt["grammar"]
        if not isinstance(spec, Mapping):
            raise GrammarError(f"{where}: expected an object holding syntax and definition", where)
    syntax, definition = spec.get("syntax", "lark"), spec.get("definition")
    if syntax not in INPUT_SYNTAXES:
        raise GrammarError(f"{where}.syntax: {syntax!r} is not one of {', '.join(INPUT_SYNTAXES)}", f"{where}.syntax")
    if not isinstance(definition, str) or not definition.strip():
        raise GrammarError(f"{where}.definition: expected the {syntax} grammar as a non-empty string", f"{where}.definition")
    if len(definition) > MAX_DEFINITION_CHARS:
        raise GrammarError(f"{where}.definition: {len(definition):,} characters; at most {MAX_DEFINITION_CHARS:,} are taken", f"{where}.definition")
    return InputGrammar(syntax, definition, where)


@dataclass(frozen=True)
class ToolGrammar:
    """The request's tools (OpenAI function form) and what tool_choice demands of them."""

    tools: Sequence[Mapping[str, Any]]
    mode: str = "auto"  # auto | none | required | named
    name: str | None = None  # the named tool
    single: bool = False  # at most one call (parallel_tool_calls false)
    # Argument values only as JSON of the property's declared type: the fallback when a tool's schema
    # holds something the grammar engine cannot compile (a look-ahead regex); clients' tool schemas are
    # not ours to refuse.
    loose: bool = False
    # Custom tools' input grammars by tool name (the tool's CUSTOM_INPUT argument must match).
    formats: Mapping[str, InputGrammar] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSpec:
    thinking: str = "none"  # one of THINK_MODES
    json_schema: Mapping[str, Any] | None = None
    tools: ToolGrammar | None = None

    @property
    def constrains(self) -> bool:
        """Whether anything here needs a grammar (free text with thinking does not)."""
        return self.json_schema is not None or self.tools is not None


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# JSON as json.dumps writes it (", " and ": "), no other whitespace: a model cannot pad forever.
_JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _json_rule(schema: Any, defs: Mapping[str, Any], *, lenient: bool = False) -> str:
    """A `%json` rule for `schema`, with the root's `$defs` / `definitions` so `$ref`s resolve.
    `lenient` (tool arguments) ignores keywords llguidance does not implement instead of refusing."""
    sub = dict(schema) if isinstance(schema, Mapping) else {}
    for key in ("$defs", "definitions"):
        if key in defs and key not in sub:
            sub[key] = defs[key]
    sub["x-guidance"] = {**_JSON_FORMAT, "lenient": True} if lenient else _JSON_FORMAT
    return "%json " + json.dumps(sub, ensure_ascii=False)


def _loose(schema: Any) -> dict[str, Any]:
    """Only the declared type of `schema` (any JSON when it declares none)."""
    kind = schema.get("type") if isinstance(schema, Mapping) else None
    return {"type": kind} if isinstance(kind, (str, list)) else {}


class _Writer:
    """Accumulates Lark rules with fresh names, and the client grammars they reference."""

    def __init__(self) -> None:
        self.rules: list[str] = []
        self.n = 0
        self.grammars: list[dict[str, Any]] = []

    def rule(self, body: str) -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules.append(f"{name}: {body}")
        return name

    def grammar(self, grammar: InputGrammar) -> str:
        name = f"input{len(self.grammars) + 1}"
        self.grammars.append(grammar.entry(name))
        return f"@{name}"


def _function(fn: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    f = fn.get("function", fn)
    params = f.get("parameters")
    return str(f.get("name", "")), params if isinstance(params, Mapping) else {}


def _value(w: _Writer, schema: Any, root: Mapping[str, Any], loose: bool) -> str:
    if is_string_schema(schema):
        enum = schema.get("enum") if isinstance(schema, Mapping) else None
        if isinstance(enum, list) and enum:
            return w.rule(" | ".join(_lit(v) for v in enum))
        return "STR"
    return w.rule(_json_rule(_loose(schema), {}) if loose else _json_rule(schema, root, lenient=True))


def _call(w: _Writer, tool: Mapping[str, Any], loose: bool, formats: Mapping[str, InputGrammar]) -> str:
    name, params = _function(tool)
    props = params.get("properties")
    parts = [_lit(name)]
    if isinstance(props, Mapping) and props:
        required = set(params.get("required") or ())
        fmt = formats.get(name)
        for key, schema in props.items():
            value = w.grammar(fmt) if fmt is not None and key == CUSTOM_INPUT else _value(w, schema, params, loose)
            arg = f"NL? <arg_key> {_lit(str(key))} </arg_key> NL? <arg_value> {value} </arg_value>"
            parts.append(f"({arg})" if key in required else f"({arg})?")
    elif params.get("additionalProperties", True) is not False:
        parts.append("(NL? <arg_key> KEY </arg_key> NL? <arg_value> STR </arg_value>)*")
    return w.rule(" ".join(parts))


def output_grammar(spec: OutputSpec) -> str | None:
    """The grammar for `spec` (Lark text; with custom tools' grammars, llguidance's top-level JSON
    listing them after it), or None when it constrains nothing."""
    if not spec.constrains:
        return None
    w = _Writer()
    alts: list[str] = []
    tg = spec.tools
    calls = None
    if tg is not None and tg.mode != "none":
        chosen = [t for t in tg.tools if tg.mode != "named" or _function(t)[0] == tg.name]
        if not chosen:
            raise GrammarError(f"tool_choice: no tool named {tg.name!r} in tools", "tool_choice")
        one = w.rule(f"<tool_call> ({' | '.join(_call(w, t, tg.loose, tg.formats) for t in chosen)}) NL? </tool_call>")
        calls = w.rule(f"{one} WS?" if tg.single else f"{one} (WS? {one})* WS?")
    if spec.json_schema is not None:
        alts.append(w.rule(_json_rule(spec.json_schema, spec.json_schema)))
        if calls is not None and tg is not None and tg.mode == "auto":
            alts.append(f"FREE? {calls}")
    elif calls is not None:
        alts.append(calls if tg is not None and tg.mode in ("required", "named") else f"FREE? ({calls})?")
    else:  # tool_choice none, no JSON: text only (no call can be opened)
        alts.append("FREE?")
    if calls is not None and tg is not None and tg.mode in ("required", "named") and spec.json_schema is not None:
        alts = [calls]  # a forced call wins over the JSON body (OpenAI: the call is the reply)
    think = {
        "none": "",
        "optional": "WS? (<think> STR </think> WS?)?",
        "open": "STR </think> WS?",
    }[spec.thinking]
    head = [f"start: {think} body", f"body: {' | '.join(alts)}"]
    lexemes = [
        f"FREE: {_FREE.replace('.*)/ &', '.+)/ &', 1)}",
        f"STR: {_FREE}",
        r"WS: /[ \t\r\n]{1,4}/",
        r"NL: /\n/",
        r"KEY: /[A-Za-z0-9_.\-]+/",
    ]
    lark = "\n".join(head + w.rules + lexemes) + "\n"
    if not w.grammars:
        return lark
    return json.dumps({"grammars": [{"name": "output", "lark_grammar": lark}, *w.grammars]}, ensure_ascii=False)
