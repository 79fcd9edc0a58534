"""Request-field checks whose messages name the field (`messages[2].content: expected ...`).

Hand-written rather than pydantic models: the two APIs accept many loosely typed unions (a string
or a list of parts, a string or a list of stops, a name or an object for tool_choice) and ignore
unknown fields; a few explicit checks say exactly which field is wrong in the words of the API's
own documentation, and every failure becomes a 400 with `param` set to that field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from .errors import bad_request

_KINDS: dict[str, str] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a JSON object",
    "array": "an array",
}


def _is(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        # JSON has one number type: 3.0 is accepted as the integer 3, true is not a number.
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, Mapping)
    if kind == "array":
        return isinstance(value, list)
    raise ValueError(kind)


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float) and not math.isfinite(value):  # Python's parser reads NaN and Infinity
        return "NaN" if math.isnan(value) else "an infinite number"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def expect(value: Any, kind: str, path: str) -> Any:
    """`value` if it is of `kind` (one of _KINDS), else a 400 naming `path`."""
    if not _is(kind, value):
        raise bad_request(f"{path}: expected {_KINDS[kind]}, got {describe(value)}", path)
    if kind == "integer":
        return int(value)
    return value


def field(
    obj: Mapping[str, Any],
    key: str,
    kind: str,
    *,
    path: str = "",
    required: bool = False,
    default: Any = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
) -> Any:
    """One field of a JSON object: absent or null gives `default` (or a 400 when `required`)."""
    where = join(path, key)
    value = obj.get(key)
    if value is None:
        if required:
            raise bad_request(f"{where}: this field is required", where)
        return default
    value = expect(value, kind, where)
    if minimum is not None and value < minimum:
        raise bad_request(f"{where}: must be at least {minimum}, got {value}", where)
    if maximum is not None and value > maximum:
        raise bad_request(f"{where}: must be at most {maximum}, got {value}", where)
    if above is not None and value <= above:
        raise bad_request(f"{where}: must be greater than {above}, got {value}", where)
    return value


def string_or_list(obj: Mapping[str, Any], key: str, *, path: str = "") -> list[str]:
    """A field that is a string or an array of strings (OpenAI `stop`); absent gives []."""
    where = join(path, key)
    value = obj.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        for i, item in enumerate(value):
            expect(item, "string", join(where, i))
        return list(value)
    raise bad_request(f"{where}: expected a string or an array of strings, got {describe(value)}", where)


def tool_schema(tool: Mapping[str, Any], key: str, path: str, default: Any = None) -> Any:
    """A tool's parameter schema (`parameters`, Anthropic's `input_schema`): an object whose `properties`, if
    any, is an object and whose `required`, if any, is an array of strings. The tool-call grammar reads both
    (a `required: true` was a 500); deeper levels are JSON Schema the grammar compiler checks itself."""
    schema = field(tool, key, "object", path=path, default=default)
    if schema is not None:
        where = join(path, key)
        field(schema, "properties", "object", path=where)
        for i, name in enumerate(field(schema, "required", "array", path=where) or []):
            expect(name, "string", join(join(where, "required"), i))
    return schema


def call_arguments(value: Any, path: str) -> dict[str, Any]:
    """A tool call's `arguments` as the model's template reads them: JSON text of an object (OpenAI's
    spelling; empty or absent is {}), or the object itself; anything else is a 400 naming `path`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    parsed = load_json(value, path, path) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise bad_request(f"{path}: expected a JSON object (as a string), got {describe(parsed)}", path)
    return dict(parsed)


def body_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise bad_request(f"request body: expected a JSON object, got {describe(data)}")
    return data


# Levels of arrays and objects a request's JSON may nest. Rendering the prompt and compiling schemas
# recurse through tool arguments and schemas, and overflowed Python's recursion limit near 500 levels
# (a 500); a real schema or tool call nests a few dozen at most.
MAX_NESTING = 128


def nesting_depth(value: Any) -> int:
    """How many levels of arrays and objects `value` nests (0 for a scalar), found a level at a time
    without recursing (a 4 MB body of small arrays takes ~0.1 s)."""
    depth = 0
    level = [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [c for item in level for c in (item.values() if isinstance(item, dict) else item) if isinstance(c, (dict, list))]
    return depth


def non_finite(value: Any) -> tuple[str, float] | None:
    """The path and value of a NaN or infinity in parsed JSON, if any (found without recursing).

    Python's parser reads NaN, Infinity and 1e400, which JSON has no values for; a reply that echoes one
    back (Responses' metadata) then cannot be written as JSON (a 500)."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return path, v
        if isinstance(v, dict):
            stack.extend((join(path, str(k)), c) for k, c in v.items())
        elif isinstance(v, list):
            stack.extend((join(path, i), c) for i, c in enumerate(v))
    return None


def load_json(text: str | bytes, where: str, param: str | None = None) -> Any:
    """The JSON value of `text` (the request body, or a field holding JSON text), nested at most
    MAX_NESTING levels; a 400 saying what is wrong with `where` otherwise, never the parser's own
    exception (a 500)."""
    try:
        value = json.loads(text)
    except UnicodeDecodeError:
        raise bad_request(f"{where} is not UTF-8 text", param) from None
    except json.JSONDecodeError as exc:
        raise bad_request(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", param) from None
    except ValueError:  # int() refuses literals longer than sys.get_int_max_str_digits() (4300 digits)
        raise bad_request(f"{where} holds an integer with too many digits", param) from None
    except RecursionError:
        raise bad_request(f"{where} is nested too deeply", param) from None
    if nesting_depth(value) > MAX_NESTING:
        raise bad_request(f"{where} is nested too deeply (more than {MAX_NESTING} levels of arrays and objects)", param)
    bad = non_finite(value)
    if bad is not None:
        inner, number = bad
        what = "NaN" if number != number else "an infinite number"
        if param is None and inner:  # the body: name the field itself
            raise bad_request(f"{inner}: expected a number, got {what} (JSON has no NaN or infinity)", inner)
        raise bad_request(f"{where}{' at ' + inner if inner else ''}: {what} is not a JSON number", param)
    return value
