"""The MTP block's native draft step (models/fused_mtp.py, models/native/mtp_draft.c) against its
Python path (models/mtp.py MtpHead.forward / greedy, the block's layer through the fused decoder):
the same drafts and the same output streams, bit for bit, for GQA, MLA and MLA + DSA, fp32 and
bf16, quantized weights (the block at 8 bits; a quantized embedding keeps the Python path), the whole head and a draft vocabulary; and speculation through it stays plain
greedy decoding (its entry point counted, so the other speculative tests run it too)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import localglm
from localglm.layers import native as native_mod
from localglm.models.glm4_moe.tiny import TinySpec as Glm4Spec
from localglm.models.glm4_moe_lite.tiny import TinySpec as LiteSpec
from localglm.models.glm_moe_dsa.tiny import TinySpec as DsaSpec
from localglm.models.mtp import MtpHead
from localglm.quantize import quantize_checkpoint
from localglm.sampling import NonFiniteLogitsError, SamplingParams
from localglm.tiny import make_tiny
from quant.formats import QuantTensor
from quant.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0)
CASES = {
    "glm4_moe-fp32": (Glm4Spec(dtype="float32"), None),
    "glm4_moe-bf16": (Glm4Spec(dtype="bfloat16"), None),
    "glm4_moe-q8-block": (Glm4Spec(dtype="bfloat16"), Recipe(bits={"embed": 16})),  # the block, experts and head quantized
    "glm4_moe-quantized": (Glm4Spec(dtype="bfloat16"), Recipe()),  # the default recipe: the embedding too (the Python path)
    "glm4_moe_lite-bf16": (LiteSpec(dtype="bfloat16"), None),
    "glm_moe_dsa-fp32": (DsaSpec(dtype="float32", index_topk=600), None),
}


@pytest.fixture(scope="module", params=list(CASES))
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> localglm.Model:
    spec, recipe = CASES[request.param]
    path = make_tiny(tmp_path_factory.mktemp(request.param) / "m", spec)
    if recipe is not None:
        out = tmp_path_factory.mktemp(request.param + "-q") / "q"
        quantize_checkpoint(path, out, recipe)
        path = out
    m = localglm.load(path, ctx=128)
    assert m.speculation is not None
    return m


def _python_draft(head: MtpHead, prev: torch.Tensor, ids: list[int], cache, start: int, depth: int) -> tuple[list[int], torch.Tensor]:
    """Speculation._draft's greedy steps through MtpHead's Python path: forward, greedy, chained forward."""
    saved, head._fused = head._fused, None  # None: no native draft step
    try:
        g = head.forward(prev.unsqueeze(0), torch.tensor([ids]), cache, start)
        rows, drafts = [g[0]], []
        for j in range(depth):
            drafts.append(head.greedy(rows[-1][-1]))
            if j + 1 < depth:
                rows.append(head.forward(rows[-1][-1:].unsqueeze(0), torch.tensor([[drafts[-1]]]), cache, start + len(ids) + j)[0])
        return drafts, torch.cat(rows)
    finally:
        head._fused = saved


@pytest.mark.parametrize("vocab", [None, "top"])
def test_native_draft_step_is_the_python_path(model: localglm.Model, vocab: str | None) -> None:
    head = model.speculation.head
    if vocab is not None and not head.rows_separable:
        pytest.skip("a quantized head drafts with the whole head")
    head.set_vocab(None if vocab is None else range(0, model.config.vocab_size, 3))
    if isinstance(head.block.w.embed, QuantTensor):  # the chained drafts' embedding rows are not read natively
        assert head.fused() is None
        return
    assert head.fused() is not None
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 400, (1, 30), generator=g)
    with torch.inference_mode():
        h = model.net.residual(tokens)  # the main model's streams
        for start, T, depth in ((0, 12, 3), (12, 1, 1), (13, 4, 0), (17, 2, 4)):
            prev, ids = h[0, start : start + T], tokens[0, start + 1 : start + 1 + T].tolist()
            a, b = head.new_cache(128), head.new_cache(128)
            if start:  # the entries before, as a catch-up wrote them
                head.forward(h[:, :start], tokens[:, 1 : start + 1], a, 0)
                head.forward(h[:, :start], tokens[:, 1 : start + 1], b, 0)
            out = head.draft_greedy(prev, ids, a, start, depth)
            assert out is not None
            drafts, streams = out
            ref_drafts, ref_streams = _python_draft(head, prev, ids, b, start, depth)
            assert drafts == ref_drafts
            assert streams.dtype == ref_streams.dtype and torch.equal(streams, ref_streams)
            fd = head.block._fused_decoder()
            (k_a, v_a), (k_b, v_b) = fd._cache(a), fd._cache(b)  # every cache entry written alike
            assert torch.equal(k_a, k_b) and (v_a is None or torch.equal(v_a, v_b))
    head.set_vocab(None)


def test_speculation_runs_the_native_step_and_stays_plain_greedy(model: localglm.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = native_mod.LayerLib.mtp_draft
    monkeypatch.setattr(native_mod.LayerLib, "mtp_draft", lambda self, *a: (calls.append(a[5]), real(self, *a))[1])
    spec = model.speculation
    prompt = list(range(30, 47))
    spec.set_draft(0)
    plain = list(model.stream_tokens(prompt, max_new_tokens=24, sampling=GREEDY, reuse_prefix=False))
    for draft in (1, 3):
        spec.set_draft(draft, adaptive=False)
        assert list(model.stream_tokens(prompt, max_new_tokens=24, sampling=GREEDY, reuse_prefix=False)) == plain
    assert (calls and max(calls) == 3) or isinstance(spec.head.block.w.embed, QuantTensor)


def test_non_finite_draft_scores_raise(model: localglm.Model) -> None:
    head = model.speculation.head
    if head.fused() is None:
        pytest.skip("the Python path: test_mtp's")
    saved = head.w.enorm.clone()
    try:
        head.w.enorm.fill_(float("nan"))
        head._fused = False  # rebuilt with the same pointers
        with torch.inference_mode(), pytest.raises(NonFiniteLogitsError):
            head.draft_greedy(torch.ones(2, model.config.hidden_size, dtype=head.block.dtype), [5, 6], head.new_cache(16), 0, 2)
    finally:
        head.w.enorm.copy_(saved)
