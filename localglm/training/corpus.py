"""The training corpus: the Python standard library's own source, present on every machine.

Two kinds of documents, both deterministic for a given Python installation:

* chat pairs: the user asks for a function by its docstring's summary line ("Write a function that
  returns ..."), the assistant answers with the function in a ```python fence. Rendered with the
  GLM-4.5 chat template as a finished turn, i.e. `<|assistant|>\\n<think></think>\\n...` followed by
  `<|user|>`, the token GLM emits to end its turn;
* plain code: whole source files;
* with `agent_share` > 0, synthetic agent conversations added to the train chat documents
  (`agent_corpus.py`: `<think>` reasoning, tool calls answered by `<tool_response>` turns).

Files are split into train / held-out by a hash of their path (about 1 in 20 held out), so the
held-out perplexity is measured on modules the model never saw.
"""

from __future__ import annotations

import ast
import sysconfig
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data", "encodings", "turtledemo"})
MAX_FILE_BYTES = 400_000
MAX_FUNCTION_CHARS = 1400
MAX_FUNCTION_LINES = 40
HELDOUT_MOD = 20

REQUEST_FORMS = (
    "Write a function that {clause}",
    "Write a Python function that {clause}",
    "Write a function `{name}` that {clause}",
    "{summary}",
    "Can you write a function that {clause}",
)


@dataclass(frozen=True)
class Example:
    """One function: where it came from, the request made of it, and its source."""

    path: str
    name: str
    request: str
    code: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of the stdlib's .py files, sorted, tests and data tables excluded."""
    root = Path(root or stdlib_dir())
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append((rel.as_posix(), path))
    out.sort()
    return out


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELDOUT_MOD == 0


def _third_person(verb: str) -> str:
    """'Return' -> 'returns', 'Match' -> 'matches', 'Apply' -> 'applies' (already 'Returns': kept)."""
    v = verb.lower()
    if not v.isalpha() or v.endswith("s") and not v.endswith("ss"):
        return v
    if v.endswith(("sh", "ch", "x", "ss", "z", "o")):
        return v + "es"
    if v.endswith("y") and len(v) > 1 and v[-2] not in "aeiou":
        return v[:-1] + "ies"
    return v + "s"


def request_for(name: str, summary: str, key: str) -> str:
    """A user request for the function, in one of REQUEST_FORMS chosen by a hash of `key`."""
    first, _, rest = summary.partition(" ")
    clause = f"{_third_person(first)} {rest}".strip() if rest else _third_person(first)
    form = REQUEST_FORMS[zlib.crc32(key.encode()) % len(REQUEST_FORMS)]
    return form.format(clause=clause, name=name, summary=summary)


def _summary(doc: str) -> str | None:
    line = doc.strip().split("\n\n", 1)[0].replace("\n", " ")
    line = " ".join(line.split())
    if not (12 <= len(line) <= 160) or not line[0].isalpha() or ">>>" in line:
        return None
    return line


def functions_in(rel: str, text: str) -> list[Example]:
    """Every function of one file with a usable docstring summary and a short body."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        summary = _summary(doc) if doc else None
        if summary is None or node.end_lineno is None:
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        code = textwrap.dedent("".join(lines[start : node.end_lineno])).rstrip()
        if len(code) > MAX_FUNCTION_CHARS or code.count("\n") + 1 > MAX_FUNCTION_LINES:
            continue
        out.append(Example(rel, node.name, request_for(node.name, summary, f"{rel}:{node.name}"), code))
    out.sort(key=lambda e: (e.path, e.code))
    return out


def chat_text(example: Example) -> str:
    """One finished chat turn in GLM-4.5's rendering, ending with the end-of-turn token `<|user|>`."""
    answer = f"```python\n{example.code}\n```"
    return f"[gMASK]<sop><|user|>\n{example.request}<|assistant|>\n<think></think>\n{answer}<|user|>"


@dataclass
class Corpus:
    train_chat: list[str]
    train_code: list[str]
    heldout_chat: list[str]
    heldout_code: list[str]
    heldout_examples: list[Example]

    def tokenizer_lines(self, limit_chars: int = 4_000_000) -> list[str]:
        """Training text for the tokenizer: chat and code interleaved, capped at `limit_chars`."""
        out, total = [], 0
        for chat, code in zip(self.train_chat, self.train_code + [""] * len(self.train_chat)):
            for doc in (chat, code):
                if doc and total < limit_chars:
                    out.extend(doc.splitlines(keepends=True))
                    total += len(doc)
        return out


def build_corpus(root: Path | None = None, max_code_chars: int | None = None, agent_share: float = 0.0, seed: int = 0) -> Corpus:
    """Read the stdlib once and split it into chat and code documents, train and held-out; then add
    `agent_share` * (train chat pairs) synthetic agent conversations to the train chat documents."""
    corpus = Corpus([], [], [], [], [])
    train_examples: list[Example] = []
    code_chars = 0
    for rel, path in source_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held = is_heldout(rel)
        examples = functions_in(rel, text)
        (corpus.heldout_chat if held else corpus.train_chat).extend(chat_text(e) for e in examples)
        if not held:
            train_examples.extend(examples)
        if held:
            corpus.heldout_examples.extend(examples)
            corpus.heldout_code.append(f"# {rel}\n{text}")
        elif max_code_chars is None or code_chars < max_code_chars:
            corpus.train_code.append(f"# {rel}\n{text}")
            code_chars += len(text)
    if agent_share > 0:
        from .agent_corpus import agent_docs

        n = round(agent_share * len(corpus.train_chat))
        corpus.train_chat.extend(agent_docs(train_examples, is_heldout, Path(root or stdlib_dir()), seed=seed,
                                            n_think=round(0.4 * n), n_docstring=round(0.4 * n), n_list=round(0.1 * n), n_no_call=round(0.1 * n)))  # fmt: skip
    return corpus
