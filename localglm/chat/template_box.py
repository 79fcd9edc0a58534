"""The time and memory box around chat-template rendering.

A chat template is code that comes with a checkpoint (or a GGUF's metadata), and it runs on every
prompt. Jinja's sandbox stops it reaching Python internals but not from looping for hours or building
a string of gigabytes (`{{ 'x' * 10**10 }}`, `'x'|center(10**10)`, a namespace variable doubled in a
loop). This environment keeps every value a template builds under `RenderLimits.max_chars`
characters / `max_items` items / `max_int_bits` bits, checked before the big allocation where the size
can be known in advance (`*`, `**`, `%`, widths passed to filters and string methods) and on every
value handed between template operations otherwise; `time_box` stops a render that runs past
`RenderLimits.seconds` by raising `RenderTimeout` in the rendering thread.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment


@dataclass(frozen=True)
class RenderLimits:
    """What one render may cost. Real GLM templates render a long conversation in milliseconds, into
    a few MB at most (the prompt must fit the context), so these only stop templates that misbehave."""

    seconds: float = 10.0
    max_chars: int = 1 << 26  # 64 Mi characters: any string built, and the whole output
    max_items: int = 1 << 20  # a list or tuple built by `*` or `+`
    max_int_bits: int = 1 << 16  # an integer built by `*` or `**`
    max_width: int = 1 << 16  # an int given to a filter or string method (`center(n)`, `indent(n)`, `tojson(indent=n)`)


class TemplateLimitError(Exception):
    """A template tried to build a value over the limits (raised inside the render, reported by it)."""


class RenderTimeout(BaseException):
    """Raised asynchronously in the rendering thread when the time box runs out. A BaseException, so
    no `except Exception` inside Jinja or a helper swallows it."""


_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


@contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise `RenderTimeout` in this thread if the block runs longer than `seconds`.

    A watchdog timer injects the exception (CPython checks for it between bytecodes, so a Python loop
    in the template stops at once; a single long C call stops when it returns, and the memory checks
    keep those short). The exception can only surface inside this block or its exit: a pending one is
    withdrawn when the block ends in time.
    """
    thread_id = threading.get_ident()
    lock = threading.Lock()
    state = {"running": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["running"]:
                state["fired"] = True
                _set_async_exc(thread_id, RenderTimeout)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            state["running"] = False
            if state["fired"]:
                _set_async_exc(thread_id, ctypes.py_object())  # NULL: withdraw it if not yet raised


_PERCENT_SPEC = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d*))?")  # printf style: width and precision
_BRACE_SPEC = re.compile(r"\{[^{}:]*:([^{}]*)\}")  # str.format: the spec after the colon
_DIGITS = re.compile(r"\d+")
# The string methods and filters (by Python name, less a `do_` prefix) whose int parameters are widths.
_WIDTH_TAKERS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs", "indent", "tojson", "_tojson"})


class _BoxedCodeGenerator(CodeGenerator):
    """Jinja's code generator with `a ~ b` (string concatenation) routed through the size check."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class BoxedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' immutable sandbox plus the size limits of `RenderLimits`."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoxedCodeGenerator

    def __init__(self, limits: RenderLimits, **options: Any) -> None:
        super().__init__(**options)
        self.limits = limits

    # ---- the checks ------------------------------------------------------------------------------------
    def _refuse(self, what: str) -> TemplateLimitError:
        return TemplateLimitError(f"{what}: over the chat template's limit")

    def checked(self, value: Any) -> Any:
        """`value` if it is within the limits; raises otherwise."""
        lim = self.limits
        if isinstance(value, str) and len(value) > lim.max_chars:
            raise self._refuse(f"a string of {len(value):,} characters (limit {lim.max_chars:,})")
        if isinstance(value, (list, tuple, dict, set)) and len(value) > lim.max_items:
            raise self._refuse(f"a collection of {len(value):,} items (limit {lim.max_items:,})")
        if isinstance(value, int) and value.bit_length() > lim.max_int_bits:
            raise self._refuse(f"an integer of {value.bit_length():,} bits (limit {lim.max_int_bits:,})")
        return value

    def _check_params(self, name: str, values: tuple) -> None:
        """The parameters of a call: each within the limits, and a width (`center(10**10)` allocates
        it) at most `max_width`."""
        widths = name.removeprefix("do_") in _WIDTH_TAKERS
        for value in values:
            if widths and isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limits.max_width:
                raise self._refuse(f"a width of {value:,} (limit {self.limits.max_width:,})")
            self.checked(value)

    def _check_format(self, fmt: Any) -> None:
        """`'%999999999d' % 1` and `'{:>999999999}'.format(1)` allocate their widths."""
        if not isinstance(fmt, str):
            return
        specs = [d for pair in _PERCENT_SPEC.findall(fmt) for d in pair if d]
        specs += [d for spec in _BRACE_SPEC.findall(fmt) for d in _DIGITS.findall(spec)]
        for digits in specs:
            if len(digits) > 18 or int(digits) > self.limits.max_width:
                raise self._refuse(f"a format width of {digits}")

    def _predict_binop(self, op: str, left: Any, right: Any) -> None:
        lim = self.limits
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    size = len(seq) * max(n, 0)
                    if size > (lim.max_chars if isinstance(seq, str) else lim.max_items):
                        raise self._refuse(f"a repetition to {size:,} {'characters' if isinstance(seq, str) else 'items'}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > lim.max_int_bits:
                raise self._refuse("an integer product over the bit limit")
        elif op == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if (left.bit_length() - 1) * right > lim.max_int_bits:
                    raise self._refuse(f"an integer power of about {(left.bit_length() - 1) * right:,} bits")
        elif op == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, type(left)):
                self.checked(left), self.checked(right)  # each at most the limit; the sum is checked after
        elif op == "%":
            self._check_format(left)

    # ---- the hooks the sandbox calls ----------------------------------------------------------------------------
    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        self._predict_binop(op, left, right)
        return self.checked(super().call_binop(context, op, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 -- Jinja's signature
        bound = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format in a checker
        __self._check_params(getattr(bound, "__name__", ""), (*args, *kwargs.values()))
        if isinstance(getattr(bound, "__self__", None), str):
            __self._predict_call(bound.__name__, bound.__self__, args)
        return __self.checked(super().call(__context, __obj, *args, **kwargs))

    def _predict_call(self, name: str, subject: Any, args: tuple) -> None:
        """The size of what a string method or filter (by its Python name) is about to build, where its
        inputs alone allow more than the limit: joins, `replace`, `indent` with a string, formats."""
        name = name.removeprefix("do_")
        n = 0
        if name in ("format", "format_map"):
            self._check_format(subject)
        elif name == "join" and isinstance(subject, str) and args and isinstance(args[0], (list, tuple)):  # sep.join(items)
            n = sum(len(x) for x in args[0] if isinstance(x, str)) + len(subject) * len(args[0])
        elif name in ("join", "sum") and isinstance(subject, (list, tuple)):  # items|join(sep), lists|sum
            n = sum(len(x) for x in subject if isinstance(x, (str, list, tuple)))
            if args and isinstance(args[0], str):
                n += len(args[0]) * len(subject)
        elif name == "replace" and isinstance(subject, str) and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            old, new = args[0], args[1]
            n = len(subject) + max((subject.count(old) if old else len(subject) + 1) * (len(new) - len(old)), 0)
        elif name == "indent" and isinstance(subject, str) and args and isinstance(args[0], str):
            n = len(subject) + len(args[0]) * (subject.count("\n") + 1)
        if n > self.limits.max_chars:
            raise self._refuse(f"a result of about {n:,} characters or items (limit {self.limits.max_chars:,})")

    def box_filters(self) -> None:
        """Wrap every filter: its parameters are checked as widths, its result as a value. Call after
        the environment's filters are all set. (Filters are called directly by compiled templates,
        and at compile time for constant arguments, so the check has to live in the filter itself.)"""
        self.filters = {name: self._boxed_filter(fn) for name, fn in self.filters.items()}

    def _boxed_filter(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        skip = 2 if getattr(fn, "jinja_pass_arg", None) is not None else 1  # (context/env, value, params...)

        @wraps(fn)
        def boxed(*args: Any, **kwargs: Any) -> Any:
            self._check_params(fn.__name__, (*args[skip:], *kwargs.values()))
            if len(args) >= skip:
                self._predict_call(fn.__name__, args[skip - 1], args[skip:])
            return self.checked(fn(*args, **kwargs))

        return boxed


def join_boxed(pieces: Iterator[str], limits: RenderLimits) -> str:
    """The output of a render, refused once it passes `limits.max_chars`."""
    out: list[str] = []
    total = 0
    for piece in pieces:
        total += len(piece)
        if total > limits.max_chars:
            raise TemplateLimitError(f"an output of more than {limits.max_chars:,} characters: over the chat template's limit")
        out.append(piece)
    return "".join(out)

