"""Count a checkpoint's tokens for its drafter's vocabulary (localglm/draft_vocab.py: the MTP head scores
only the most frequent tokens; the verification keeps the full head).

    python -m localglm.training.draft_vocab localglm/data/default_model         # its own training corpus
    python -m localglm.training.draft_vocab /models/GLM-4.5-Air --text a.txt b.jsonl

The default model is counted on the corpus it was trained on (corpus.build_corpus with the settings in
its localglm_training.json), chat and code weighted as its training batches mix them (chat_share).
Any other checkpoint is counted on the text files given: text like what it will be asked (its training
data is not at hand; a few MB of chats, code or documents in the languages used cover the frequent
tokens). Writes MODEL/draft_vocab.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..draft_vocab import write_table
from ..errors import LocalGLMError


def _tokenizer(root: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    if not path.is_file():
        raise LocalGLMError(f"{path}: no tokenizer.json to count tokens with")
    return Tokenizer.from_file(str(path))


def count_docs(tok, docs: Sequence[str]) -> Counter[int]:  # type: ignore[no-untyped-def]
    counts: Counter[int] = Counter()
    for enc in tok.encode_batch(list(docs), add_special_tokens=False):
        counts.update(enc.ids)
    return counts


def corpus_counts(root: Path) -> tuple[Counter[float], str]:
    """The default model's training mixture: chat and code token counts, each scaled to its share of the batches."""
    from .corpus import build_corpus

    meta = root / "localglm_training.json"
    if not meta.is_file():
        raise LocalGLMError(f"{root}: no localglm_training.json (not a model localglm trained): give --text FILE... to count on")
    cfg = json.loads(meta.read_text(encoding="utf-8"))["train_config"]
    corpus = build_corpus(max_code_chars=cfg["max_code_chars"], agent_share=cfg.get("agent_share", 0.0), seed=cfg.get("seed", 0))
    tok = _tokenizer(root)
    chat, code = count_docs(tok, corpus.train_chat), count_docs(tok, corpus.train_code)
    share = cfg.get("chat_share", 0.75)
    total_chat, total_code = sum(chat.values()) or 1, sum(code.values()) or 1
    mixed: Counter[float] = Counter()
    for i in chat.keys() | code.keys():
        mixed[i] = round(1e9 * (share * chat[i] / total_chat + (1 - share) * code[i] / total_code))
    return mixed, f"its training corpus (chat {share:.2f} / code {1 - share:.2f}, per 1e9 training tokens)"


def text_counts(root: Path, files: Sequence[Path]) -> tuple[Counter[int], str]:
    tok = _tokenizer(root)
    docs = []
    for f in files:
        try:
            docs.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise LocalGLMError(f"{f}: cannot read ({e.strerror})") from e
    return count_docs(tok, docs), "text: " + ", ".join(Path(f).name for f in files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m localglm.training.draft_vocab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("model", type=Path, help="the checkpoint directory (its tokenizer.json; draft_vocab.json is written there)")
    ap.add_argument("--text", type=Path, nargs="+", default=None, metavar="FILE", help="count these files (default: the training corpus of a model localglm trained)")
    args = ap.parse_args(argv)
    try:
        if not args.model.is_dir():
            raise LocalGLMError(f"{args.model}: not a checkpoint directory (draft_vocab.json sits in one; a GGUF file drafts with the whole head)")
        counts, source = text_counts(args.model, args.text) if args.text else corpus_counts(args.model)
        if not counts:
            raise LocalGLMError("no tokens counted: the text is empty")
        path = write_table(args.model, counts, source)
    except LocalGLMError as e:
        print(f"localglm: error: {e}", file=sys.stderr)
        return 2
    total = sum(counts.values())
    ranked = sorted(counts.values(), reverse=True)
    cover = ", ".join(f"top {n}: {sum(ranked[:n]) / total:.1%}" for n in (512, 1024, 2048, 4096) if n < len(ranked))
    print(f"{path}: {len(counts)} tokens seen ({source}); share of the tokens counted covered by the {cover}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
