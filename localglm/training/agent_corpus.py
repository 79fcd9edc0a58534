"""Synthetic agent conversations in GLM's own formats, so the default model can think and call tools.

Three kinds, all rendered through the packaged GLM-4.5 chat template (`templates/glm45.jinja`, the
default model's chat_template.jinja), so every byte is what `localglm` renders and parses at run time:

* thinking: a function request with a cue to reason ("Think step by step. ..."), answered with a
  `<think>` block (facts about the function read from its source: parameters, loops, calls, what it
  returns) before the code fence;
* tool calls: with tools in the system prompt, a question about a standard-library function
  ("What does `json.dumps` do?") answered by a `<tool_call>get_docstring` with its `<arg_key>` /
  `<arg_value>`, the `<|observation|>` turn holding the function's real docstring (`inspect.getdoc`)
  in a `<tool_response>`, then an answer quoting it; likewise `list_functions` for a module;
* a function request with tools present and no call (tools are there to be used when they help).

Deterministic for one Python installation and seed. Functions are looked up only in modules whose
source is not held out (`corpus.is_heldout`), so the held-out perplexity sets stay unseen.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..chat.template import ChatTemplate, builtin_template
from .corpus import _third_person

END_OF_TURN = "<|user|>"  # the token GLM emits to end its turn; every document ends with it

# Modules whose public functions the tool examples look up (pure-Python or builtin, import-safe).
LOOKUP_MODULES = (
    "base64", "bisect", "calendar", "colorsys", "copy", "csv", "datetime", "difflib", "fnmatch", "fractions",
    "functools", "glob", "gzip", "hashlib", "heapq", "html", "inspect", "ipaddress", "itertools", "json",
    "keyword", "math", "operator", "os", "os.path", "pprint", "random", "re", "secrets", "shlex", "shutil",
    "statistics", "string", "struct", "tempfile", "textwrap", "time", "urllib.parse", "uuid", "zlib",
)  # fmt: skip

TOOL_GET_DOCSTRING = {
    "type": "function",
    "function": {
        "name": "get_docstring",
        "description": "Return the docstring of a Python standard library function.",
        "parameters": {
            "type": "object",
            "properties": {"name": {"type": "string", "description": "The function's dotted name, e.g. json.dumps"}},
            "required": ["name"],
        },
    },
}
TOOL_LIST_FUNCTIONS = {
    "type": "function",
    "function": {
        "name": "list_functions",
        "description": "List the public functions of a Python standard library module.",
        "parameters": {
            "type": "object",
            "properties": {"module": {"type": "string", "description": "The module's name, e.g. textwrap"}},
            "required": ["module"],
        },
    },
}
TOOL_SETS = ((TOOL_GET_DOCSTRING,), (TOOL_GET_DOCSTRING, TOOL_LIST_FUNCTIONS), (TOOL_LIST_FUNCTIONS, TOOL_GET_DOCSTRING))

THINK_CUES = (
    "Think step by step. {request}",
    "{request} Think it through before you answer.",
    "Reason about it first: {request}",
    "{request} Explain your reasoning.",
)
DOC_QUESTIONS = (
    "What does `{name}` do?",
    "Show me the docstring of {name}.",
    "How do I use {name}?",
    "Look up the documentation of `{name}`.",
    "What is {name} for?",
)
LIST_QUESTIONS = (
    "Which functions does the {module} module have?",
    "List the functions in `{module}`.",
    "What can I use from {module}?",
)
MAX_DOC_CHARS = 700


def template() -> ChatTemplate:
    return ChatTemplate(builtin_template("glm45"), name="glm45 chat template")


def render(tpl: ChatTemplate, messages: list[dict], tools: Sequence[dict] | None = None) -> str:
    """One finished conversation as the template renders it, plus GLM's end-of-turn token."""
    return tpl.render(messages, tools=list(tools) if tools else None, add_generation_prompt=False) + END_OF_TURN


# ---- thinking ------------------------------------------------------------------------------------
def _clause(request: str) -> str:
    """'Write a function that returns x.' -> 'returns x' (the request's own words, for the reasoning)."""
    for lead in ("Can you write a function that ", "Write a Python function that ", "Write a function that "):
        if request.startswith(lead):
            return request[len(lead) :].rstrip(".?")
    if request.startswith("Write a function `") and "` that " in request:
        return request.split("` that ", 1)[1].rstrip(".?")
    first, _, rest = request.rstrip(".?").partition(" ")
    return f"{_third_person(first)} {rest}".strip()


def reasoning_for(name: str, request: str, code: str) -> str:
    """A short, true account of how the function does what is asked, read from its source."""
    try:
        fn = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    except (SyntaxError, StopIteration):
        return f"The user wants a function that {_clause(request)}. I will write `{name}`."
    params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
    nodes = list(ast.walk(fn))
    calls = Counter(
        n.func.id if isinstance(n.func, ast.Name) else n.func.attr
        for n in nodes
        if isinstance(n, ast.Call) and isinstance(n.func, (ast.Name, ast.Attribute))
    )
    out = [f"The user wants a function that {_clause(request)}."]
    if params:
        out.append(f"I will call it `{name}` and give it the parameter{'s' if len(params) > 1 else ''} {', '.join(f'`{p}`' for p in params)}.")
    else:
        out.append(f"I will call it `{name}`; it needs no parameters.")
    if any(isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension)) for n in nodes):
        out.append("It has to go through the items one at a time, so it needs a loop.")
    elif any(isinstance(n, ast.While) for n in nodes):
        out.append("It repeats until a condition changes, so a while loop fits.")
    if any(isinstance(n, ast.If) for n in nodes):
        out.append("Some cases need their own handling, so it checks them with if.")
    used = [c for c, _ in calls.most_common(3) if c != name]
    if used:
        out.append(f"It can build on {', '.join(f'`{c}()`' for c in used)}.")
    if name in calls:
        out.append("It can call itself on the smaller part.")
    if any(isinstance(n, ast.Raise) for n in nodes):
        out.append("Bad input should raise an exception.")
    if any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in nodes):
        out.append("It should yield the values one by one.")
    elif any(isinstance(n, ast.Return) and n.value is not None for n in nodes):
        out.append("At the end it returns the result.")
    out.append("Now I can write the code.")
    return " ".join(out)


def thinking_doc(tpl: ChatTemplate, name: str, request: str, code: str, rng: random.Random) -> str:
    cue = rng.choice(THINK_CUES).format(request=request)
    messages = [
        {"role": "user", "content": cue},
        {"role": "assistant", "reasoning_content": reasoning_for(name, request, code), "content": f"```python\n{code}\n```"},
    ]
    return render(tpl, messages)


# ---- tools ---------------------------------------------------------------------------------------
def lookup_pool(is_heldout, stdlib: Path) -> dict[str, list[tuple[str, object]]]:
    """module -> [(dotted name, function)] of public functions with docstrings, sorted; held-out sources left out."""
    pool: dict[str, list[tuple[str, object]]] = {}
    for mod_name in LOOKUP_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if _held_out(mod, is_heldout, stdlib):
            continue
        rows = []
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) and _held_out(obj, is_heldout, stdlib):
                continue
            if inspect.getdoc(obj):
                rows.append((f"{mod_name}.{attr}", obj))
        if rows:
            pool[mod_name] = rows
    return pool


def _held_out(obj: object, is_heldout, stdlib: Path) -> bool:
    try:
        src = inspect.getsourcefile(obj)  # type: ignore[arg-type]
    except TypeError:  # builtin: no source file, not in the corpus
        return False
    if not src:
        return False
    try:
        rel = Path(src).resolve().relative_to(stdlib.resolve()).as_posix()
    except ValueError:
        return False
    return is_heldout(rel)


def _signature(name: str, obj: object) -> str:
    try:
        return name + str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return name + "(...)"


def _clip(doc: str, limit: int = MAX_DOC_CHARS) -> str:
    if len(doc) <= limit:
        return doc
    cut = doc.rfind("\n", 0, limit)
    return doc[: cut if cut > limit // 2 else limit].rstrip() + "\n..."


def docstring_doc(tpl: ChatTemplate, name: str, obj: object, rng: random.Random) -> str:
    doc = inspect.getdoc(obj) or ""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    question = rng.choice(DOC_QUESTIONS).format(name=name)
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "reasoning_content": f"The user asks about `{name}`. I can look up its docstring with get_docstring.",
         "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_docstring", "arguments": {"name": name}}}]},  # fmt: skip
        {"role": "tool", "content": _clip(doc)},
        {"role": "assistant", "content": f"`{_signature(name, obj)}`: {first}"},
    ]
    return render(tpl, messages, rng.choice(TOOL_SETS))


def list_doc(tpl: ChatTemplate, module: str, rows: list[tuple[str, object]], rng: random.Random) -> str:
    names = [n.rsplit(".", 1)[1] for n, _ in rows]
    question = rng.choice(LIST_QUESTIONS).format(module=module)
    shown = names[:12]
    more = f", and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "reasoning_content": f"The user wants the functions of `{module}`. list_functions gives them.",
         "content": "", "tool_calls": [{"type": "function", "function": {"name": "list_functions", "arguments": {"module": module}}}]},  # fmt: skip
        {"role": "tool", "content": "\n".join(names)},
        {"role": "assistant", "content": f"`{module}` has {len(names)} public functions: {', '.join(f'`{n}`' for n in shown)}{more}."},
    ]
    return render(tpl, messages, (TOOL_LIST_FUNCTIONS, TOOL_GET_DOCSTRING))


def no_call_doc(tpl: ChatTemplate, request: str, code: str, rng: random.Random) -> str:
    messages = [{"role": "user", "content": request}, {"role": "assistant", "content": f"```python\n{code}\n```"}]
    return render(tpl, messages, rng.choice(TOOL_SETS))


def agent_docs(examples: Sequence, is_heldout, stdlib: Path, *, n_think: int, n_docstring: int, n_list: int, n_no_call: int,
               seed: int = 0) -> list[str]:  # fmt: skip
    """The synthetic conversations: `examples` are (train) `corpus.Example`s to think about."""
    rng = random.Random(seed)
    tpl = template()
    out = []
    if examples:
        for ex in rng.sample(list(examples), min(n_think, len(examples))):
            out.append(thinking_doc(tpl, ex.name, ex.request, ex.code, rng))
        for ex in rng.sample(list(examples), min(n_no_call, len(examples))):
            out.append(no_call_doc(tpl, ex.request, ex.code, rng))
    pool = lookup_pool(is_heldout, stdlib)
    flat = [row for mod in sorted(pool) for row in pool[mod]]
    if flat:
        for name, obj in (rng.choice(flat) for _ in range(n_docstring)):
            out.append(docstring_doc(tpl, name, obj, rng))
        mods = sorted(pool)
        for _ in range(n_list):
            mod = rng.choice(mods)
            out.append(list_doc(tpl, mod, pool[mod], rng))
    rng.shuffle(out)
    return out
