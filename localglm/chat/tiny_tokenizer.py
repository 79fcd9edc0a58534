"""A small GLM-shaped tokenizer, trained in about a second, for tests and toy checkpoints.

It has the same structure as GLM-4.5's (byte-level BPE behind the cl100k-style split regex, the
GLM special tokens as special added tokens at the top of the vocabulary, a separate
`chat_template.jinja`), so every code path that handles a real GLM tokenizer runs on it, and it
loads in transformers. The corpus is a fixed list of Python standard-library sources, which every
machine running localglm has, so no download is needed and the result is reproducible.
"""

from __future__ import annotations

import json
import os
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from .template import builtin_template
from ..errors import TokenizerError

# GLM-4.5's special tokens, in its vocabulary order (ids 151329.. in the real tokenizer).
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>",
    "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
)  # fmt: skip

# GLM-4.5's pre-tokenizer split pattern (the cl100k one): contractions, letters, 1-3 digits, punctuation runs.
GLM_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Standard-library sources used as the training corpus, in this order.
CORPUS_FILES = (
    "textwrap.py", "string.py", "difflib.py", "json/decoder.py", "json/encoder.py",
    "argparse.py", "calendar.py", "shlex.py", "heapq.py", "bisect.py", "fractions.py",
)  # fmt: skip
CORPUS_BYTES = 200_000
BYTE_ALPHABET = 256
TINY_MODEL_MAX_LENGTH = 131072


def corpus_text(limit: int = CORPUS_BYTES) -> str:
    """The fixed training text: the CORPUS_FILES of this Python's stdlib, concatenated and truncated."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in CORPUS_FILES:
        path = stdlib / name
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
    text = "\n".join(parts)[:limit]
    if not text:
        raise TokenizerError(f"no training text: none of {', '.join(CORPUS_FILES)} found in {stdlib}")
    return text


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _train(vocab_size: int, lines: Sequence[str] | None = None) -> Tokenizer:
    """Byte-level BPE with `vocab_size - len(GLM_SPECIAL_TOKENS)` ordinary tokens, then the special ones.

    `lines` is the training text (default: `corpus_text()`); GLM special tokens in it are not split.
    """
    base_size = vocab_size - len(GLM_SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    if lines is None:
        lines = corpus_text().splitlines(keepends=True)
    else:  # the special tokens are added afterwards; keep their text out of the merges
        lines = [_strip_specials(line) for line in lines]
    most = BYTE_ALPHABET + sum(len(line) for line in lines)  # each merge joins two symbols of the text: fewer than its characters
    if base_size > most:  # asked of the trainer, an absurd size aborts the process in its allocator (vocab_size 2**31 - 1)
        raise TokenizerError(f"vocab_size {vocab_size}: the corpus supports fewer than {most + len(GLM_SPECIAL_TOKENS)}")
    tok.train_from_iterator(lines, trainer=trainer)
    if tok.get_vocab_size() != base_size:
        raise TokenizerError(
            f"vocab_size {vocab_size}: the corpus only supports {tok.get_vocab_size() + len(GLM_SPECIAL_TOKENS)}"
        )
    tok.add_special_tokens(list(GLM_SPECIAL_TOKENS))
    return tok


def _strip_specials(line: str) -> str:
    for token in GLM_SPECIAL_TOKENS:
        if token in line:
            line = line.replace(token, " ")
    return line


def _tokenizer_config(special_ids: dict[str, int]) -> dict:
    """tokenizer_config.json in the shape GLM-4.5 ships (minus its chat template, kept in its own file)."""
    added = {
        str(idx): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, idx in special_ids.items()
    }
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in GLM_SPECIAL_TOKENS if t != "<|endoftext|>"],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": TINY_MODEL_MAX_LENGTH,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def build_tiny_tokenizer(
    out_dir: Path, vocab_size: int = 512, style: str = "glm45", corpus: Sequence[str] | None = None
) -> dict[str, int]:
    """Train the tiny tokenizer into `out_dir` and return its special-token -> id map.

    Writes tokenizer.json, tokenizer_config.json and chat_template.jinja ("glm45" or "glm47"
    format). `corpus` is the training text as lines (default: the fixed stdlib excerpt of
    `corpus_text()`). Deterministic: the same Python version and corpus yield byte-identical files.
    """
    minimum = BYTE_ALPHABET + len(GLM_SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size {vocab_size}: must be at least {minimum} (256 bytes + GLM special tokens + 1)"
        )
    template = builtin_template(style)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train(vocab_size, corpus)
    special_ids = {token: tok.token_to_id(token) for token in GLM_SPECIAL_TOKENS}
    expected = list(range(vocab_size - len(GLM_SPECIAL_TOKENS), vocab_size))
    if list(special_ids.values()) != expected:
        raise TokenizerError(f"vocab_size {vocab_size}: special tokens did not land at the top of the vocabulary")
    _write_atomic(out_dir / "tokenizer.json", tok.to_str(pretty=True))
    _write_atomic(
        out_dir / "tokenizer_config.json",
        json.dumps(_tokenizer_config(special_ids), indent=2, ensure_ascii=False) + "\n",
    )
    _write_atomic(out_dir / "chat_template.jinja", template)
    return special_ids
