"""The drafter's vocabulary (localglm/draft_vocab.py, FR-Spec): the MTP head scores only a checkpoint's most
frequent tokens, the verification keeps the whole head.

- The subset's logits are the whole head's numbers for those rows, -inf elsewhere.
- Greedy speculation with it gives plain decoding's tokens (the packaged default model and its table).
- Speculative sampling stays exact with a proposal that is zero outside the subset.
- The table: counted from text by `python -m localglm.training.draft_vocab`, chosen by `draft_vocab=`,
  and one-line errors for a missing or broken file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import localglm
from localglm import draft_vocab
from localglm.default_model import default_model_path
from localglm.errors import LocalGLMError
from localglm.models.glm4_moe.tiny import TinySpec
from localglm.sampling import Sampler, SamplingParams
from localglm.speculative import accept_or_resample
from localglm.tiny import make_tiny
from localglm.training.draft_vocab import main as count_main

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_tiny(tmp_path_factory.mktemp("dv") / "m", TinySpec(dtype="bfloat16"))
    text = tmp_path_factory.mktemp("text") / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 50 + "the quick brown fox " * 80, encoding="utf-8")
    assert count_main([str(path), "--text", str(text)]) == 0
    return path


def test_counted_table_ranks_the_texts_tokens(tiny_dir: Path) -> None:
    table = json.loads((tiny_dir / draft_vocab.FILE).read_text())
    assert table["counts"] == sorted(table["counts"], reverse=True) and len(table["ids"]) == len(table["counts"]) > 5
    from tokenizers import Tokenizer

    fox = Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(" fox", add_special_tokens=False).ids
    assert set(fox) <= set(table["ids"][:40])  # tokens the text repeats 80 times rank high
    assert draft_vocab.read_table(tiny_dir, 10**6) == table["ids"]


def test_subset_logits_are_the_heads_rows(tiny_dir: Path) -> None:
    model = localglm.load(tiny_dir, draft_vocab=16)
    head = model.speculation.head
    assert head.vocab is not None and head.vocab.tolist() == sorted(draft_vocab.read_table(tiny_dir, model.config.vocab_size)[:16])
    x = torch.randn(3, model.config.hidden_size).to(model.net.dtype)
    sub, full = head.logits(x), head.logits(x, full=True)
    inside = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    inside[head.vocab] = True
    assert torch.equal(sub[:, inside], full[:, inside])
    assert torch.isneginf(sub[:, ~inside]).all()
    for row in x:  # the greedy drafter's pick, from the subset's scores alone: the argmax of the row
        assert head.greedy(row) == int(head.logits(row).argmax())
    assert model.config.vocab_size <= draft_vocab.DEFAULT_SIZE
    assert localglm.load(tiny_dir).speculation.head.vocab is None  # the default size covers this whole vocabulary
    assert localglm.load(tiny_dir, draft_vocab=0).speculation.head.vocab is None


def test_greedy_speculation_with_the_default_models_table_is_plain_decoding() -> None:
    model = localglm.load(default_model_path())
    spec = model.speculation
    assert spec.head.vocab is not None and spec.head.vocab.numel() == draft_vocab.DEFAULT_SIZE
    for text in ("Write a function that reverses a string.", "How do I read a CSV file?"):
        ids = model.encode_chat([{"role": "user", "content": text}]).ids
        spec.set_draft(0)
        plain = list(model.stream_tokens(ids, max_new_tokens=40, sampling=GREEDY, reuse_prefix=False))
        for depth in (1, 3):
            spec.set_draft(depth, adaptive=False)
            assert list(model.stream_tokens(ids, max_new_tokens=40, sampling=GREEDY, reuse_prefix=False)) == plain


def test_sampling_stays_exact_with_a_proposal_zero_outside_the_subset() -> None:
    """Draft d ~ q (zero on tokens 4, 5), accept_or_resample: the output's distribution is p's."""
    p = torch.tensor([0.3, 0.05, 0.2, 0.1, 0.25, 0.1])
    q = torch.tensor([0.1, 0.4, 0.3, 0.2, 0.0, 0.0])
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3))
    n = 40000
    hist = torch.zeros(6)
    for _ in range(n):
        tok, _ = accept_or_resample(p, q, sampler.sample(q), sampler)
        hist[tok] += 1
    chi2 = float(((hist - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 20.5  # 5 degrees of freedom: p < 0.001 if the distribution were p
    assert hist[4] > 0 and hist[5] > 0  # tokens the drafter never proposes still come out, from the residual


def test_bad_tables_and_options_are_one_line_errors(tmp_path: Path, tiny_dir: Path) -> None:
    bare = make_tiny(tmp_path / "bare", TinySpec(dtype="bfloat16"))
    assert localglm.load(bare).speculation.head.vocab is None  # no table: the whole head
    with pytest.raises(LocalGLMError, match="no draft_vocab.json"):
        localglm.load(bare, draft_vocab=64)
    with pytest.raises(LocalGLMError, match="draft_vocab=-1"):
        localglm.load(bare, draft_vocab=-1)
    (bare / draft_vocab.FILE).write_text("{not json")
    with pytest.raises(LocalGLMError, match="draft_vocab.json: not a draft vocabulary"):
        localglm.load(bare)
    (bare / draft_vocab.FILE).write_text(json.dumps({"ids": [1, 2, 10**7]}))
    with pytest.raises(LocalGLMError, match="token ids in 0"):
        localglm.load(bare)
    assert localglm.load(tiny_dir, lm_head_bits=8).speculation.head.vocab is None  # a quantized head drafts whole by default ...
    with pytest.raises(NotImplementedError, match="quantized lm_head"):
        localglm.load(tiny_dir, lm_head_bits=8, draft_vocab=16)  # ... and says so when a subset is asked for
    assert count_main([str(bare)]) == 2  # not a model localglm trained, and no --text
    assert count_main([str(bare / "config.json"), "--text", str(bare / "config.json")]) == 2  # not a directory
