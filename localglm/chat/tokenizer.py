"""The checkpoint's tokenizer: tokenizer.json through the Rust `tokenizers` library, plus its chat template.

We load the same three files transformers 5 reads (tokenizer.json, tokenizer_config.json,
chat_template.jinja, which wins over the config's template) and give the same ids and the same
rendered prompt, without importing transformers. GLM templates write `[gMASK]<sop>` as text, so
`encode` never adds a BOS: the special tokens in the text become their single ids.

Chat prompts differ from transformers on purpose in one way: `render_prompt` encodes the text of
user, system and tool messages (and tool schemas) without parsing special tokens, so a user, or a
web page an agent read, cannot forge turns by typing `<|assistant|>`; only the template's own
markup becomes special tokens. `parse_special_tokens=True` restores transformers' behaviour.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from .template import BUILTIN_TEMPLATES, ChatTemplate, builtin_template, detect_format, parse_string_tool_arguments
from ..errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"

# Named special-token attributes transformers passes to chat templates (SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end an assistant turn in GLM chats (generation_config.json lists these as eos ids).
GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# Above this many characters, text is encoded through `encode_batch`, which releases the GIL (plain
# `encode` holds it for the whole call: seconds for a few MB, with every other thread stalled).
_GIL_FREE_CHARS = 16384
_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> str:
    """`text` with lone UTF-16 surrogates as U+FFFD.

    JSON may escape them (`"\\ud800"`, e.g. an emoji cut in half by a UTF-16 truncation) and Python
    keeps undecodable argv bytes as them; Rust strings cannot hold them, so the tokenizer would fail.
    """
    return text if text.isascii() or not _SURROGATE.search(text) else _SURROGATE.sub("\ufffd", text)


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: the text the model reads, and how to encode it.

    `parts` are plain-text pieces (encoded without parsing special tokens) and the ids of the
    template's markup special tokens between them; None means `text` is encoded parsing every
    special token in it (transformers' way, `parse_special_tokens=True`).
    """

    text: str
    parts: tuple[str | int, ...] | None = None


class _ContentEscaper:
    """Swaps special-token text in untrusted strings for placeholders, and back after rendering.

    The template sees a placeholder where content spelled a special token, or ended with the start
    of one (so that two strings the template joins cannot form one); every special token left in
    the rendered text is then the template's markup. Placeholders are ASCII (they survive `tojson`
    whatever its options), made of characters no special token contains (no special token can
    overlap one) and of a nonce found nowhere in the input or the template.
    """

    def __init__(self, specials: Sequence[str], haystack: str) -> None:
        used = set("".join(specials))
        free = [c for c in "QZXJVWYKHGFqzxjvwykhgf~^" if c not in used] or ["\x1a"]
        k = 0
        while f"{free[0]}{k}{free[0]}" in haystack:
            k += 1
        self.nonce = f"{free[0]}{k}{free[0]}"
        self.table: list[str] = []
        self._whole = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        self._prefixes = {t[:n] for t in specials for n in range(1, len(t))}
        self._longest = max(map(len, specials)) - 1
        self._placeholder = re.compile(re.escape(self.nonce) + r"(\d+)" + re.escape(self.nonce))

    def _hide(self, text: str) -> str:
        self.table.append(text)
        return f"{self.nonce}{len(self.table) - 1}{self.nonce}"

    def escape(self, text: str) -> str:
        out = self._whole.sub(lambda m: self._hide(m.group(0)), text)
        for n in range(min(self._longest, len(out)), 0, -1):
            if out[-n:] in self._prefixes:
                return out[:-n] + self._hide(out[-n:])
        return out

    def escape_all(self, value: Any, *, keep: frozenset[str] = frozenset()) -> Any:
        """`value` with every string in it (dict keys included) escaped, except the values of `keep` keys."""
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, Mapping):
            return {self.escape_all(k): (v if k in keep else self.escape_all(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape_all(v) for v in value]
        return value

    def restore(self, text: str) -> str:
        out = self._placeholder.sub(lambda m: self.table[int(m.group(1))], text)
        if self.nonce in out:
            raise TokenizerError(
                "the chat template changed escaped message text; encode with parse_special_tokens=True "
                "(serve --parse-special-tokens) to use it"
            )
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


class Tokenizer:
    """A GLM checkpoint's tokenizer and chat template(s)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        source: str = "tokenizer",
    ) -> None:
        """Wrap a loaded `tokenizers.Tokenizer`; `chat_templates` maps names ("default", "tool_use") to sources."""
        self._backend = backend
        self._config = dict(config or {})
        self._template_sources = dict(chat_templates or {})
        self._compiled: dict[str, ChatTemplate] = {}
        self.source = source
        self.is_byte_level = self._uses_byte_level_decoder(backend)

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, *, chat_template: str | None = None) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and chat_template.jinja from a checkpoint folder.

        `chat_template` overrides the checkpoint's template: Jinja source, or "glm45"/"glm47" for a
        template shipped with localglm (for checkpoints that ship none).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a directory")
        tokenizer_path = folder / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise TokenizerError(f"{tokenizer_path}: missing (the checkpoint's tokenizer is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust loader raises plain Exception for every kind of corruption
            raise TokenizerError(f"{tokenizer_path}: cannot load ({' '.join(str(exc).split())[:200]})") from None

        config: dict[str, Any] = {}
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            loaded = _read_json(config_path)
            if not isinstance(loaded, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
            config = loaded

        templates = cls._templates_from_config(config, config_path)
        # As in transformers 5, separate template files take priority over the config's entries.
        template_file = folder / TEMPLATE_FILE
        file_templates: dict[str, str] = {}
        if template_file.is_file():
            file_templates["default"] = cls._read_text(template_file)
        template_dir = folder / TEMPLATE_DIR
        if template_dir.is_dir():
            for extra in sorted(template_dir.glob("*.jinja")):
                file_templates[extra.stem] = cls._read_text(extra)
        if file_templates:
            templates = file_templates
        if chat_template is not None:
            builtin = chat_template in BUILTIN_TEMPLATES
            templates = {"default": builtin_template(chat_template) if builtin else chat_template}
            return cls(backend, config=config, chat_templates=templates, source=f"{folder} (override template)")
        return cls(backend, config=config, chat_templates=templates, source=str(folder))

    def save(self, folder: str | Path) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json and the chat template(s) (chat_template.jinja,
        additional_chat_templates/NAME.jinja) into `folder`, so that `from_dir(folder)` gives this tokenizer back."""
        folder = Path(folder)
        written = [folder / TOKENIZER_FILE, folder / CONFIG_FILE]
        try:
            self._backend.save(str(written[0]), pretty=True)
            config = {k: v for k, v in self._config.items() if k != "chat_template"}  # the template files say it
            written[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            for name, text in self._template_sources.items():
                if not name or name.startswith(".") or any(c in name for c in "/\\:"):
                    raise TokenizerError(f"{self.source}: chat template name {name!r} cannot be a file name")
                path = folder / TEMPLATE_FILE if name == "default" else folder / TEMPLATE_DIR / f"{name}.jinja"
                path.parent.mkdir(exist_ok=True)
                path.write_text(text, encoding="utf-8")
                written.append(path)
        except OSError as exc:
            raise TokenizerError(f"{folder}: cannot write the tokenizer ({exc.strerror or exc})") from None
        return written

    @staticmethod
    def _read_text(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: cannot read ({exc.__class__.__name__})") from None

    @staticmethod
    def _templates_from_config(config: Mapping[str, Any], config_path: Path) -> dict[str, str]:
        """The config's `chat_template`: one string, or a list of {"name", "template"} entries."""
        value = config.get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list):
            out = {}
            for entry in value:
                if not (
                    isinstance(entry, dict)
                    and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)
                ):
                    raise TokenizerError(f"{config_path}: chat_template list entries need string 'name' and 'template'")
                out[entry["name"]] = entry["template"]
            return out
        raise TokenizerError(f"{config_path}: chat_template must be a string or a list of named templates")

    @staticmethod
    def _uses_byte_level_decoder(backend: tokenizers.Tokenizer) -> bool:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        return decoder.get("type") == "ByteLevel"

    # ---- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in it parsed; no BOS/EOS added (chat templates write
        those as text). Lone surrogates are encoded as U+FFFD."""
        return _encode_all(self._backend, [replace_surrogates(text)])[0]

    @cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that encodes special-token text as ordinary text."""
        plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def _special_matcher(self) -> tuple[re.Pattern[str], tuple[int, ...]] | None:
        """A pattern finding special tokens in text as the backend does (longest first, with their
        lstrip/rstrip/single_word flags; group i+1 is the token with id ids[i]), or None when there are none."""
        tokens = sorted(
            ((i, t) for i, t in self._backend.get_added_tokens_decoder().items() if t.special),
            key=lambda it: len(it[1].content),
            reverse=True,
        )
        if not tokens:
            return None
        forms = []
        for _, t in tokens:
            form = re.escape(t.content)
            if t.single_word:
                form = rf"(?<!\w){form}(?!\w)"
            forms.append("(" + (r"\s*" if t.lstrip else "") + form + (r"\s*" if t.rstrip else "") + ")")
        # The lookahead lets the regex engine skip ahead to a possible first character: without it,
        # every position of a 3 MB prompt tries every token (seconds instead of milliseconds).
        firsts = {t.content[0] for _, t in tokens} | (set(" \t\r\n") if any(t.lstrip for _, t in tokens) else set())
        lookahead = "(?=[" + "".join(re.escape(c) for c in sorted(firsts)) + "])"
        return re.compile(lookahead + "(?:" + "|".join(forms) + ")"), tuple(i for i, _ in tokens)

    @cached_property
    def max_token_chars(self) -> int | None:
        """At most this many characters of text become one token, or None when no such bound holds.

        Byte-level BPE without a normalizer turns each byte into one vocabulary character, so a
        token never covers more characters than its vocabulary string is long; this lets a prompt
        of more than ctx * max_token_chars characters be refused before it is tokenized.
        """
        if not self.is_byte_level or self._backend.normalizer is not None:
            return None
        if json.loads(self._backend.to_str()).get("model", {}).get("type") != "BPE":
            return None
        return max(len(t) for t in self._backend.get_vocab(with_added_tokens=True))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as transformers' `decode` gives it."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string (vocabulary form), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string (vocabulary form) of one id, or None."""
        return self._backend.id_to_token(token_id)

    @cached_property
    def special_token_ids(self) -> dict[str, int]:
        """Every special added token, by its text (e.g. "<|user|>" -> 151336)."""
        return {t.content: i for i, t in sorted(self._backend.get_added_tokens_decoder().items()) if t.special}

    @cached_property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (`eos_token`, `pad_token`, ...) the config sets; what templates receive."""
        named: dict[str, str] = {}
        for key in NAMED_SPECIAL_TOKENS:
            text = _token_text(self._config.get(key))
            if text is not None:
                named[key] = text
        for key, value in self._config.items():
            # transformers also passes any other `*_token` string (or serialized AddedToken) entry.
            is_token = isinstance(value, str) or (isinstance(value, Mapping) and value.get("__type") == "AddedToken")
            if key.endswith("_token") and key not in named and is_token:
                named[key] = _token_text(value)
        for source_key in ("extra_special_tokens", "model_specific_special_tokens"):
            extra = self._config.get(source_key)
            if isinstance(extra, Mapping):
                named.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
        return named

    @cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: the config's eos token and GLM's role/end tokens."""
        names = [self.special_tokens_map.get("eos_token"), *GLM_STOP_TOKENS]
        ids = [self.token_to_id(n) for n in names if n is not None]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A streaming decoder for generated ids."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """Source of the default chat template, or None when the checkpoint ships none."""
        if not self._template_sources:
            return None
        return self._template_sources.get("default", next(iter(self._template_sources.values())))

    def _template(self, tools: list | None, name: str | None = None) -> ChatTemplate:
        """Pick a template the way transformers' `get_chat_template` does, compiling it once."""
        sources = self._template_sources
        if not sources:
            raise TokenizerError(
                f"{self.source}: no chat template (expected {TEMPLATE_FILE} or 'chat_template' in {CONFIG_FILE})"
            )
        if name is None:
            if tools and "tool_use" in sources:
                name = "tool_use"
            elif "default" in sources:
                name = "default"
            else:
                raise TokenizerError(
                    f"{self.source}: several chat templates ({', '.join(sorted(sources))}) and none named 'default'"
                )
        if name not in sources:
            raise TokenizerError(f"{self.source}: no chat template named {name!r}")
        if name not in self._compiled:
            label = TEMPLATE_FILE if name == "default" else f"chat template {name!r}"
            self._compiled[name] = ChatTemplate(sources[name], name=f"{self.source}: {label}")
        return self._compiled[name]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        *,
        template_name: str | None = None,
        **kw: Any,
    ) -> str:
        """Render the prompt text for `messages`, as transformers' `apply_chat_template(tokenize=False)`.

        Tool-call arguments given as JSON strings (OpenAI style) are parsed first, since GLM
        templates need objects. Extra keyword arguments become template variables.
        """
        template = self._template(tools, template_name)
        return template.render(
            parse_string_tool_arguments(list(messages)),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            special_tokens=self.special_tokens_map,
            **kw,
        )

    def render_prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        *,
        parse_special_tokens: bool = False,
        template_name: str | None = None,
        **kw: Any,
    ) -> ChatPrompt:
        """The prompt for `messages`, ready for `encode_prompt`.

        By default the text of every message but the assistant's (the model's own turns, whose
        think tags the template reads) and of `tools` is taken literally: special-token text in it
        stays text. It is rendered with that text hidden behind placeholders, so every special token
        in the output is the template's markup; the placeholders are then put back as plain text.
        """
        args = (add_generation_prompt, enable_thinking)
        matcher = self._special_matcher
        if parse_special_tokens or matcher is None:
            return ChatPrompt(self.apply_chat_template(messages, tools, *args, template_name=template_name, **kw))
        pattern, ids = matcher
        source = self._template(tools, template_name).source
        haystack = source + json.dumps([messages, tools], ensure_ascii=False, default=str)
        esc = _ContentEscaper(list(self.special_token_ids), haystack)
        hidden = [
            m if not isinstance(m, Mapping) or m.get("role") == "assistant" else esc.escape_all(m, keep=frozenset({"role"}))
            for m in messages
        ]
        hidden_tools = esc.escape_all(tools) if tools is not None else None
        rendered = self.apply_chat_template(hidden, hidden_tools, *args, template_name=template_name, **kw)
        parts: list[str | int] = []
        at = 0
        for m in pattern.finditer(rendered):
            parts += [replace_surrogates(esc.restore(rendered[at : m.start()])), ids[m.lastindex - 1]]
            at = m.end()
        parts.append(replace_surrogates(esc.restore(rendered[at:])))
        return ChatPrompt(esc.restore(rendered), tuple(p for p in parts if p != ""))

    def encode_prompt(self, prompt: ChatPrompt) -> list[int]:
        """Token ids of a rendered prompt (see `ChatPrompt`)."""
        if prompt.parts is None:
            return self.encode(prompt.text)
        texts = [p for p in prompt.parts if isinstance(p, str)]
        encoded = iter(_encode_all(self._plain_backend, texts))
        ids: list[int] = []
        for part in prompt.parts:
            if isinstance(part, str):
                ids.extend(next(encoded))
            else:
                ids.append(part)
        return ids

    @cached_property
    def format(self) -> str:
        """Chat format family: "glm47" (generation opens with <think>, calls without newlines) or "glm45"."""
        return detect_format(self._template(None))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _encode_all(backend: tokenizers.Tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, no special tokens added; long inputs go through `encode_batch`, which
    releases the GIL, so a server's event loop keeps running while a big prompt is tokenized."""
    if len(texts) == 1 and len(texts[0]) < _GIL_FREE_CHARS:
        return [backend.encode(texts[0], add_special_tokens=False).ids]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


class IncrementalDecoder:
    """Token ids in, text deltas out; never emits half a character.

    Byte-level BPE splits a multi-byte UTF-8 character across tokens, so decoding token by token
    would print U+FFFD. For byte-level vocabularies we map each token to its raw bytes and let an
    incremental UTF-8 decoder hold back an unfinished character; for other decoders we re-decode a
    short window and hold back while it ends in U+FFFD. Concatenating all deltas (and `finish()`)
    gives exactly `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._special_ids = frozenset(tokenizer.special_token_ids.values())
        self._byte_cache: dict[int, bytes] = {}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Window state for non-byte-level decoders.
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, as the ByteLevel decoder produces them."""
        cached = self._byte_cache.get(token_id)
        if cached is not None:
            return cached
        if self._skip_special and token_id in self._special_ids:
            raw = b""
        else:
            token = self._tokenizer.id_to_token(token_id)
            if token is None:
                raw = b""
            elif any(ch not in _UNICODE_TO_BYTE for ch in token):
                raw = token.encode("utf-8")  # what the ByteLevel decoder does with unmappable tokens
            else:
                raw = bytes(_UNICODE_TO_BYTE[ch] for ch in token)
        self._byte_cache[token_id] = raw
        return raw

    def feed(self, ids: int | Iterable[int]) -> str:
        """Decode newly generated id(s); returns the text that is now complete (maybe "")."""
        batch = [ids] if isinstance(ids, int) else list(ids)
        if self._tokenizer.is_byte_level:
            return self._utf8.decode(b"".join(self._token_bytes(i) for i in batch))
        self._ids.extend(batch)
        return self._window_delta(final=False)

    def finish(self) -> str:
        """Flush what is held back (an unfinished character becomes U+FFFD, as in a full decode)."""
        if self._tokenizer.is_byte_level:
            return self._utf8.decode(b"", final=True)
        return self._window_delta(final=True)

    def _window_delta(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special)
        full = decode(self._ids[self._prefix_offset :], self._skip_special)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""
