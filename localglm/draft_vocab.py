"""The drafter's vocabulary: the MTP head's logits over a checkpoint's most frequent tokens only (FR-Spec,
Zhao et al. 2025).

A draft's cost is mostly its lm_head (the default model: 8192 rows of a 256-wide head against one
eh_proj and one layer; GLM-4.5: 151k rows of 5120). The drafter computes the logits of the N most
frequent tokens and leaves the rest at -inf; the verification keeps the full head. So greedy output
is unchanged (a draft outside the subset is never proposed, one inside is accepted exactly when it is
the main model's argmax), and at temperature > 0 the proposal q is zero outside the subset, where
speculative sampling (speculative.accept_or_resample) never proposes and the residual max(0, p - q)
is p itself: the output is still distributed as p. What the subset costs is acceptance: the main
model's choices outside it.

The frequencies come from a file beside the checkpoint, `draft_vocab.json`: {"ids": [token ids, most
frequent first], "counts": [...], "source": "what was counted"}. The packaged default model ships one
counted on its own training corpus; `python -m localglm.training.draft_vocab MODEL --text FILE...`
counts any checkpoint's tokens in text like what it will be asked (its training data is not at hand).
Without the file the drafter uses the full head.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import LocalGLMError

FILE = "draft_vocab.json"
DEFAULT_SIZE = 2048  # tokens the drafter scores where the checkpoint ships a table (load's draft_vocab=None)


def read_table(root: Path, vocab_size: int) -> list[int] | None:
    """The token ids of `root`'s draft_vocab.json, most frequent first; None without the file."""
    path = Path(root) / FILE
    if not path.is_file():
        return None
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))["ids"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LocalGLMError(f"{path}: not a draft vocabulary ({type(e).__name__}: {e}); expected {{\"ids\": [token ids, most frequent first]}}") from e
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise LocalGLMError(f"{path}: \"ids\" must be a list of token ids in 0..{vocab_size - 1}")
    if len(set(ids)) != len(ids):
        raise LocalGLMError(f"{path}: \"ids\" lists a token twice")
    return ids


def choose(root: Path, vocab_size: int, size: int | None) -> list[int] | None:
    """The drafter's token ids (sorted), or None for the full head. `size`: None = DEFAULT_SIZE where
    the checkpoint ships a table (else the full head); 0 = the full head; N = the N most frequent
    (a clear error without a table)."""
    if size == 0:
        return None
    table = read_table(root, vocab_size)
    if table is None:
        if size is None:
            return None
        raise LocalGLMError(f"draft_vocab={size}: {root} has no {FILE} to pick the most frequent tokens from "
                            f"(make one: python -m localglm.training.draft_vocab {root} --text FILE...)")  # fmt: skip
    n = DEFAULT_SIZE if size is None else size
    if n >= vocab_size:
        return None
    return sorted(table[:n])


def write_table(root: Path, counts: Counter[int], source: str) -> Path:
    """Write `counts` (token id -> occurrences) as root/draft_vocab.json, most frequent first (ties by id)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    path = Path(root) / FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"source": source, "ids": [i for i, _ in ranked], "counts": [c for _, c in ranked]}), encoding="utf-8")
    tmp.replace(path)
    return path
