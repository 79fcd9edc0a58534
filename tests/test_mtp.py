"""The MTP draft head (models/mtp.py) and speculative decoding (speculative.py).

- The head's math against transformers: the MTP block's decoder layer run as a one-layer
  transformers model of the same architecture, fed the eh_proj input, for GQA, MLA and MLA + DSA.
- Loading from HF, localglm-quantized (the block at 8 bits by default) and GGUF checkpoints.
- Greedy speculation gives the tokens plain decoding gives: random heads (every draft rejected) and an
  oracle drafter (a wrong draft every few tokens: partial acceptance and rollback), with prefix reuse,
  stop strings and tool calls.
- Speculative sampling: chi-square of the accept/resample step against the target on a tiny vocabulary,
  and of whole generations' first two tokens against the exact joint distribution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import localglm
from localglm.checkpoint.safetensors import save_safetensors_sharded
from localglm.checkpoint.source import SafetensorsSource
from localglm.layers.linear import linear
from localglm.layers.norm import rms_norm
from localglm.models.glm4_moe.tiny import TinySpec as Glm4Spec
from localglm.models.glm4_moe_lite.tiny import TinySpec as LiteSpec
from localglm.models.glm_moe_dsa.tiny import TinySpec as DsaSpec
from localglm.sampling import Sampler, SamplingParams
from localglm.speculative import RETRY_AFTER, Speculation, accept_or_resample
from localglm.stats import GenerationStats
from localglm.tiny import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0)
SPECS = {
    "glm4_moe": Glm4Spec(dtype="float32"),
    "glm4_moe_lite": LiteSpec(dtype="float32"),
    "glm_moe_dsa": DsaSpec(dtype="float32", index_topk=6),  # prompts longer than the top-k: selection active
}
HF_CLASSES = {"glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM"}


@pytest.fixture(scope="module", params=list(SPECS))
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, make_tiny(tmp_path_factory.mktemp(request.param) / "m", SPECS[request.param])


@pytest.fixture(scope="module")
def glm4(tmp_path_factory: pytest.TempPathFactory) -> localglm.Model:
    return localglm.load(make_tiny(tmp_path_factory.mktemp("glm4") / "m", SPECS["glm4_moe"]))


def _plain(model: localglm.Model, ids: list[int], n: int, **kw: Any) -> list[int]:
    """Tokens without speculation (draft 0 runs the engine's own loop)."""
    spec = model.speculation
    assert spec is not None
    saved = spec.max_draft
    spec.set_draft(0)
    try:
        return list(model.stream_tokens(ids, max_new_tokens=n, sampling=kw.pop("sampling", GREEDY), **kw))
    finally:
        spec.set_draft(saved)


def _speculative(model: localglm.Model, ids: list[int], n: int, draft: int, stats: GenerationStats | None = None, **kw: Any) -> list[int]:
    assert model.speculation is not None
    model.speculation.set_draft(draft, adaptive=False)
    return list(model.stream_tokens(ids, max_new_tokens=n, sampling=kw.pop("sampling", GREEDY), stats=stats, **kw))


# ---- the head's math ------------------------------------------------------------------------------


def _one_layer_reference(src: Path, out: Path, block: int) -> Path:
    """The MTP block's decoder layer as a one-layer checkpoint of the same architecture (transformers'
    names), with shared_head.norm as its final norm and the main embedding and lm_head."""
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
    if "indexer_types" in cfg:
        cfg["indexer_types"] = ["full"]
    if "mlp_layer_types" in cfg:
        cfg["mlp_layer_types"] = ["sparse"]
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    p = f"model.layers.{block}."
    own = {f"{p}{t}.weight" for t in ("eh_proj", "enorm", "hnorm", "shared_head.norm")}
    tensors: dict[str, torch.Tensor] = {}
    with SafetensorsSource(src) as s:
        for name in s.names():
            if name in own:
                continue
            if name.startswith(p):
                tensors["model.layers.0." + name[len(p) :]] = s.get(name).clone()
            elif not name.startswith("model.layers."):
                tensors[name] = s.get(name).clone()
        tensors["model.norm.weight"] = s.get(f"{p}shared_head.norm.weight").clone()
    save_safetensors_sharded(iter(tensors.items()), out, max_shard_bytes=1 << 30, metadata={"format": "pt"})
    return out


def test_head_matches_transformers_one_layer_model(arch_dir: tuple[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    arch, path = arch_dir
    model = localglm.load(path, dtype="float32")
    head = model.speculation.head
    assert head.layer == model.config.num_hidden_layers
    ref_dir = _one_layer_reference(path, tmp_path / "ref", head.layer)
    hf = getattr(transformers, HF_CLASSES[arch]).from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        h = model.net.residual(ids[:, :-1])  # the main model's streams before its final norm
        # the block's input, as the issue and llama.cpp's graph define it
        eps = model.config.rms_norm_eps
        e = rms_norm(torch.nn.functional.embedding(ids[:, 1:], model.net.w.embed), head.w.enorm, eps)
        x = linear(torch.cat([e, rms_norm(h, head.w.hnorm, eps)], -1), head.w.eh_proj)
        ref = hf(inputs_embeds=x).logits.float()[0]
        # ours: one batched call, then the same positions chained one at a time through the block's cache
        ours = head.logits(head.forward(h, ids[:, 1:], None, 0))[0]
        cache = head.new_cache(32)
        steps = [head.logits(head.forward(h[:, :6], ids[:, 1:7], cache, 0))[0]]
        for t in range(6, 13):
            steps.append(head.logits(head.forward(h[:, t : t + 1], ids[:, t + 1 : t + 2], cache, t))[0])
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-4 * scale
    assert (torch.cat(steps) - ref).abs().max().item() <= 1e-4 * scale


# ---- loading --------------------------------------------------------------------------------------


def test_load_options(tmp_path: Path, glm4: localglm.Model) -> None:
    path = glm4.path
    assert localglm.load(path, mtp=False).speculation is None
    none = make_tiny(tmp_path / "none", Glm4Spec(num_nextn_predict_layers=0))
    assert localglm.load(none).speculation is None
    with pytest.raises(localglm.LocalGLMError, match="no MTP block"):
        localglm.load(none, mtp=True)
    with pytest.raises(localglm.LocalGLMError, match="mtp="):
        localglm.load(path, mtp="yes")


def test_quantized_dir_keeps_the_block_at_8_bits(tmp_path: Path, glm4: localglm.Model) -> None:
    from localglm.quantize import quantize_checkpoint

    out = tmp_path / "q"
    quantize_checkpoint(glm4.path, out, None)  # the default recipe: experts 4 bits, mtp 8
    from localglm.checkpoint.quantized_dir import read_manifest

    man = read_manifest(out)
    n = glm4.config.num_hidden_layers
    assert man["recipe"]["bits"]["mtp"] == 8
    assert man["tensors"][f"model.layers.{n}.eh_proj.weight"]["spec"].startswith("q8")
    assert man["tensors"][f"model.layers.{n}.self_attn.q_proj.weight"]["spec"].startswith("q8")
    assert man["experts"]["layouts"][str(n)]["gate_up"].startswith("q8")
    assert man["experts"]["layouts"]["1"]["gate_up"].startswith("q4")
    q = localglm.load(out)
    assert q.speculation is not None
    prompt = list(range(20, 45))
    assert _speculative(q, prompt, 12, 2) == _plain(q, prompt, 12)


@pytest.mark.parametrize("experts, mtp", [(16, 8), (4, 16)])
def test_quantized_dir_with_float_experts_on_one_side(tmp_path: Path, glm4: localglm.Model, experts: int, mtp: int) -> None:
    """Float main experts beside the block's quantized ones (`quantize --experts 16`: the block keeps its
    default 8 bits), and the reverse: each side loads as stored, and speculation stays exact."""
    from localglm.checkpoint.quantized_dir import read_manifest
    from localglm.quantize import quantize_checkpoint
    from quant.recipe import Recipe, default_bits

    out = tmp_path / "q"
    quantize_checkpoint(glm4.path, out, Recipe(bits={**default_bits(), "experts": experts, "mtp": mtp}))
    layouts = read_manifest(out)["experts"]["layouts"]
    n = glm4.config.num_hidden_layers
    assert (str(n) in layouts, "1" in layouts) == (mtp != 16, experts != 16)
    q = localglm.load(out)
    assert q.speculation is not None
    prompt = list(range(20, 45))
    assert _speculative(q, prompt, 12, 2) == _plain(q, prompt, 12)


def test_gguf_round_trip_keeps_the_block(tmp_path: Path, glm4: localglm.Model) -> None:
    from localglm.checkpoint.gguf import export_gguf

    g = localglm.load(export_gguf(glm4.path, tmp_path / "m.gguf", "f32", mtp=True)[0], dtype="float32")
    assert g.speculation is not None
    ids = torch.randint(0, glm4.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        a, b = glm4.speculation.head, g.speculation.head
        h = glm4.net.residual(ids[:, :-1])
        la, lb = a.logits(a.forward(h, ids[:, 1:], None, 0)), b.logits(b.forward(h, ids[:, 1:], None, 0))
    assert torch.allclose(la, lb, atol=1e-5)
    assert localglm.load(export_gguf(glm4.path, tmp_path / "nomtp.gguf", "f32", mtp=False)[0]).speculation is None


# ---- greedy: the plain tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("draft", [1, 3])
def test_greedy_random_head_matches_plain(arch_dir: tuple[str, Path], draft: int) -> None:
    _, path = arch_dir
    model = localglm.load(path)
    g = torch.Generator().manual_seed(7)
    for length, new in ((3, 9), (17, 20), (40, 6)):
        prompt = torch.randint(0, 400, (length,), generator=g).tolist()
        stats = GenerationStats()
        assert _speculative(model, prompt, new, draft, stats, reuse_prefix=False) == _plain(model, prompt, new, reuse_prefix=False)
        assert stats.draft_tokens > 0 and stats.acceptance_length >= 1.0


def _oracle(model: localglm.Model, reference: list[int], wrong_every: int) -> None:
    """Make the drafter propose the reference continuation, with every `wrong_every`-th token wrong:
    the block still runs (its cache is kept as in real use), only its proposals are replaced."""
    spec = model.speculation
    real = Speculation._draft

    def draft(self: Speculation, *args):  # type: ignore[no-untyped-def]
        drafts, qs, guide = real(self, *args)
        at = len(args[-1])  # the last argument: the tokens generated so far
        good = reference[at : at + len(drafts)]
        return [t if (at + i + 1) % wrong_every else (t + 1) % model.config.vocab_size for i, t in enumerate(good)], qs, guide

    spec._draft = draft.__get__(spec)  # type: ignore[method-assign]


def test_greedy_partial_acceptance_and_rollback(arch_dir: tuple[str, Path]) -> None:
    _, path = arch_dir
    model = localglm.load(path)
    prompt = list(range(30, 52))
    ref = _plain(model, prompt, 40, reuse_prefix=False)
    turn2 = prompt + ref[:25] + [7, 8, 9]  # the next turn resends prompt + answer + more
    fresh = _plain(model, turn2, 15, reuse_prefix=False)
    _oracle(model, ref, wrong_every=5)
    for draft in (1, 2, 4):
        stats = GenerationStats()
        assert _speculative(model, prompt, 40, draft, stats, reuse_prefix=False) == ref
        assert stats.accepted_tokens > 0 and stats.accepted_tokens < stats.draft_tokens
        assert stats.acceptance_length > 1.0
    _check_mtp_cache(model)
    # prefix reuse: the caches (main and MTP) and the kept streams of the last turn are reused
    _oracle(model, fresh, wrong_every=4)
    stats = GenerationStats()
    assert _speculative(model, turn2, 15, 3, stats) == fresh
    assert stats.cached_prompt_tokens == len(prompt) + 25  # all the common prefix: no stream recomputed for the block
    _check_mtp_cache(model)


def test_drafting_after_plain_decoding_keeps_the_prompt(arch_dir: tuple[str, Path]) -> None:
    """A plain generation between two speculative ones changes the main cache only past its reused prefix:
    the MTP block keeps its state before that, so the next drafting turn recomputes only what the plain
    turn added (it used to prefill the whole prompt again)."""
    _, path = arch_dir
    model, ref = localglm.load(path), localglm.load(path)
    turn1 = list(range(30, 90))
    out1 = _speculative(model, turn1, 10, 2)
    turn2 = turn1 + out1 + [7, 8]
    out2 = _plain(model, turn2, 10)
    turn3 = turn2 + out2 + [9, 10, 11]
    held = len(turn2) + len(out2) - 1  # the plain turn's last token was sampled, never run
    assert model.speculation is not None and model.speculation.reusable(turn3, held)[1] == len(turn1) + 9  # streams kept up to turn 2's change
    stats = GenerationStats()
    out3 = _speculative(model, turn3, 12, 2, stats)
    assert stats.cached_prompt_tokens == held  # the rows past the kept streams are run for their streams, then put back
    assert stats.draft_tokens > 0
    _plain(ref, turn1, 10)
    _plain(ref, turn2, 10)
    assert out3 == _plain(ref, turn3, 12)
    _check_mtp_cache(model)


def test_the_adaptive_depth_does_not_prefill_the_prompt_again_to_draft(arch_dir: tuple[str, Path]) -> None:
    """A seeded request decodes plain; where the next request would have to compute more than CATCH_UP_MAX of
    the cached prompt again for the block to catch up, it decodes plain too, keeping the whole prefix."""
    from localglm.speculative import CATCH_UP_MAX

    _, path = arch_dir
    model = localglm.load(path, ctx=CATCH_UP_MAX + 200)
    assert model.speculation is not None and not model.speculation.policy.fixed
    prompt = [(7 * i) % 400 + 10 for i in range(CATCH_UP_MAX + 40)]
    out = list(model.stream_tokens(prompt, max_new_tokens=4, sampling=SamplingParams(temperature=0, seed=3)))
    stats = GenerationStats()
    list(model.stream_tokens(prompt + out + [5], max_new_tokens=4, sampling=GREEDY, stats=stats))
    assert stats.cached_prompt_tokens == len(prompt) + 3 and stats.draft_tokens == 0
    stats = GenerationStats()  # a short new conversation costs nothing to catch up: drafting is tried again
    list(model.stream_tokens([3, 4, 5, 6, 7, 8], max_new_tokens=8, sampling=GREEDY, stats=stats))
    assert stats.draft_depths


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offloaded_speculation_prefetches_the_drafts_guessed_experts(tmp_path: Path, dtype: str) -> None:
    """Offloaded experts (simulated device, a cache of a few experts): the MTP block's output streams go to
    the prefetcher as guesses for every layer before each verification. The tokens stay plain decoding's,
    the guesses are scored against what each layer then used, and where a layer's guesses have been
    right they are copied in (prefetched) before the verification asks for them."""
    path = make_tiny(tmp_path / "m", Glm4Spec(dtype=dtype))
    # bf16: the verification's expert calls (several rows) give the one-row numbers (layers/experts.py EXACT_ROWS)
    opts: dict[str, Any] = dict(offload="sim", gpu_mem="64MiB", cache_slots=6, ctx=128, dtype=dtype, stats_path=tmp_path / "s.npz")
    model = localglm.load(path, **opts)
    backend = model.net.experts
    prompt = list(range(30, 52))
    ref = _plain(model, prompt, 30, reuse_prefix=False)
    guessed = []
    real = backend.guess
    backend.guess = lambda streams: (guessed.append(streams.shape), real(streams))[1]  # type: ignore[method-assign]
    _oracle(model, ref, wrong_every=5)
    before = backend.counters.copy()
    assert _speculative(model, prompt, 30, 3, reuse_prefix=False) == ref
    pred = backend.predictor
    assert guessed and all(shape[0] <= 3 and shape[1] == model.config.hidden_size for shape in guessed)
    scored = {layer: c for layer, c in pred.counts_guess.items() if c.tp + c.fp}
    assert set(scored) == set(pred.layers) == set(model.config.moe_layers)  # every main MoE layer's guesses met its routing (not the MTP block's)
    snap = backend.stats_snapshot()
    assert 0 < snap["guess_precision"] <= 1 and 0 < snap["guess_recall"] <= 1
    # every layer trusted (precision floor 0): more prefetched than with guesses never taken
    import offload.backend as ob

    def run(floor: float) -> int:
        m = localglm.load(path, **opts)
        _oracle(m, ref, wrong_every=5)
        ob_floor, ob.GUESS_MIN_PRECISION = ob.GUESS_MIN_PRECISION, floor
        try:
            assert _speculative(m, prompt, 30, 3, reuse_prefix=False) == ref
        finally:
            ob.GUESS_MIN_PRECISION = ob_floor
        return m.net.experts.counters.prefetched

    assert run(0.0) > run(2.0)
    assert backend.counters.tokens > before.tokens


def test_mtp_cache_rollback_dsa_without_selection(tmp_path: Path) -> None:
    """GLM-5's cache rolled back (DSA's top-k breaks exact score ties by the call's shape, so compared
    below the top-k, where attention is dense, exactly)."""
    model = localglm.load(make_tiny(tmp_path / "m", DsaSpec(dtype="float32", index_topk=600)))
    prompt = list(range(30, 52))
    ref = _plain(model, prompt, 30, reuse_prefix=False)
    _oracle(model, ref, wrong_every=3)
    assert _speculative(model, prompt, 30, 3) == ref
    _check_mtp_cache(model)


def _check_mtp_cache(model: localglm.Model) -> None:
    """After rollbacks, the MTP cache holds exactly the entries a fresh run over the accepted tokens
    computes: the next block call reads the same keys either way."""
    spec, main = model.speculation, model._cache
    mcache, head = spec.cache, spec.head
    n = mcache.length
    if 0 < getattr(model.config, "index_topk", 0) <= n:
        return  # exact ties in DSA's top-k go by the call's shape: test_mtp_cache_rollback_dsa_without_selection
    tokens = main.tokens[: n + 1] + [5]  # any token after the last cached one will do
    assert n >= 1 and mcache.tokens == tokens[1 : n + 1] and len(main.tokens) > n
    with torch.inference_mode():
        h = model.net.residual(torch.tensor([tokens]))
        fresh = head.new_cache(mcache.max_tokens)
        for t in range(n):  # one entry at a time, as decoding writes them (GLM-5's top-k breaks exact ties per call)
            head.forward(h[:, t : t + 1], torch.tensor([tokens[t + 1 : t + 2]]), fresh, t)
        nxt = torch.tensor([[tokens[n + 1]]])
        ours, ref = head.forward(h[:, n : n + 1], nxt, mcache, n), head.forward(h[:, n : n + 1], nxt, fresh, n)
    mcache.truncate(n)
    assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_greedy_with_stop_strings_and_tool_calls(glm4: localglm.Model) -> None:
    tok = glm4.tokenizer
    script = tok.encode("<think>look it up</think><tool_call>lookup\n<arg_key>name</arg_key>\n<arg_value>os.path</arg_value>\n</tool_call>")

    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = logits.clone()
        out[script[len(generated)] if len(generated) < len(script) else glm4.config.eos_token_ids[0]] += 1e4
        return out

    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"name": {"type": "string"}}}}}]
    msgs = [{"role": "user", "content": "what is os.path?"}]
    runs = []
    for draft in (0, 3):
        glm4.speculation.set_draft(draft, adaptive=False)
        events = list(glm4.generate(messages=msgs, tools=tools, logits_processor=force, max_new_tokens=60, sampling=GREEDY))
        runs.append(events)
    plain, spec = runs
    calls = [e.call for e in spec if type(e).__name__ == "ToolCallEnd"]
    assert calls and calls[0].name == "lookup" and calls[0].arguments == {"name": "os.path"}
    def shown(events: list) -> list:
        call = lambda e: getattr(e, "call", None)  # noqa: E731
        return [(type(e).__name__, getattr(e, "text", None), getattr(e, "name", None), getattr(call(e), "arguments", None)) for e in events[:-1]]

    assert shown(spec) == shown(plain)
    done = spec[-1]
    assert done.text == plain[-1].text and done.finish_reason == plain[-1].finish_reason == "stop"
    assert done.stats.acceptance_length > 2  # forced tokens are what the head drafts (the processor shapes drafts)
    # stop strings: cut where plain decoding cuts
    glm4.speculation.set_draft(0)
    text = glm4.generate_text("hello there", max_new_tokens=30, sampling=GREEDY, ignore_eos=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    outs = []
    for draft in (0, 2):
        glm4.speculation.set_draft(draft, adaptive=False)
        events = list(glm4.generate("hello there", max_new_tokens=30, sampling=GREEDY, ignore_eos=True, stop=[stop]))
        outs.append((events[-1].text, events[-1].finish_reason))
    assert outs[0] == outs[1] and outs[0][1] == "stop_string"


# ---- sampling: the target's distribution ----------------------------------------------------------

CHI2_999 = {2: 13.82, 4: 18.47, 8: 26.12}  # chi-square quantiles at 0.999


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was sampled"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_accept_or_resample_gives_the_target_distribution() -> None:
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.3, 0.2, 0.0, 0.3])  # q puts mass where p has none, and misses p's token 4
    sampler = Sampler(SamplingParams(temperature=1.0, seed=11))
    counts = torch.zeros(6)
    accepted = 0
    n = 20000
    for _ in range(n):
        d = sampler.sample(q)
        tok, ok = accept_or_resample(p, q, d, sampler)
        counts[tok] += 1
        accepted += ok
    assert _chi2(counts, p) < CHI2_999[4]
    # acceptance = sum min(p, q) = 0.1 + 0.1 + 0.15 + 0.1 = 0.45
    assert abs(accepted / n - 0.45) < 0.02


def test_speculative_sampling_matches_exact_joint_distribution(glm4: localglm.Model) -> None:
    """The first two generated tokens (the second comes out of a verification step) over many seeded
    generations, against the exact joint distribution with top-k 3 (nine outcomes)."""
    params = SamplingParams(temperature=1.0, top_k=3)
    prompt = list(range(60, 75))
    with torch.inference_mode():
        first = Sampler(params).distribution(glm4.logits(torch.tensor([prompt]))[0, -1])
        joint = {}
        for a in first.nonzero().flatten().tolist():
            second = Sampler(params).distribution(glm4.logits(torch.tensor([prompt + [a]]))[0, -1])
            for b in second.nonzero().flatten().tolist():
                joint[(a, b)] = float(first[a] * second[b])
    cells = sorted(joint)
    expected = torch.tensor([joint[c] for c in cells])

    def run(n: int) -> torch.Tensor:
        counts = torch.zeros(len(cells))
        stats = GenerationStats()
        glm4.speculation.set_draft(1, adaptive=False)
        for seed in range(n):
            out = list(glm4.stream_tokens(prompt, max_new_tokens=3, sampling=params.updated(seed=seed), stats=stats))
            counts[cells.index(tuple(out[:2]))] += 1  # the second token comes out of a verification of one draft
            assert stats.draft_tokens == 1
        return counts

    assert _chi2(run(400), expected) < CHI2_999[8]  # the random head: drafts mostly rejected, resampled
    # a drafter close to the target (its logits at a quarter of the temperature): drafts often accepted
    spec = glm4.speculation
    real = Speculation._draft

    def near(self, *args):  # type: ignore[no-untyped-def]
        sampler, generated = args[5], args[-1]
        guide = real(self, *args)[2]
        q = sampler.distribution(glm4.logits(torch.tensor([prompt + generated]))[0, -1] * 4.0)
        return [sampler.sample(q)], [q], guide[:1]

    spec._draft = near.__get__(spec)  # type: ignore[method-assign]
    try:
        counts = run(400)
    finally:
        del spec._draft
    assert _chi2(counts, expected) < CHI2_999[8]


# ---- depth ----------------------------------------------------------------------------------------


def test_depth_policy_prices_experts() -> None:
    from localglm.speculative import DepthPolicy, StepCosts

    # GLM-4.5-Air-like: verifying two tokens costs ~1.4x one; a draft call a few percent
    costs = StepCosts(fixed=370.0, layers=45, top_k=8, n_experts=128, draft=50.0)
    good = DepthPolicy(4, costs, hits=90, tries=100)
    assert good.choose(10) >= 2
    assert good.choose(1) == 1  # the budget caps it
    bad = DepthPolicy(4, costs, hits=5, tries=100)
    assert bad.choose(10) == 0
    # offloaded experts priced 20x a resident read: extra experts do not pay at the same acceptance
    dear = DepthPolicy(4, StepCosts(fixed=370.0, layers=45, top_k=8, n_experts=128, draft=50.0, price=lambda: 20.0), hits=60, tries=100)
    cheap = DepthPolicy(4, costs, hits=60, tries=100)
    assert dear.choose(10) < cheap.choose(10)
    # measured step times replace the model's price: a verification timed at 5x a plain step does not pay
    timed = DepthPolicy(4, costs, hits=90, tries=100)
    timed.observe_time(0, 0.01)
    assert timed.choose(10) >= 2  # untimed depths: the model's price scaled by depth 0's time
    for k in range(1, 5):
        timed.observe_time(k, 0.05)
    assert timed.choose(10) == 0
    assert all(timed.choose(10) == 0 for _ in range(100))  # 5 tokens can never pay 5x: no exploring either
    timed.reset()
    assert timed.seconds == {} and timed.choose(10) == DepthPolicy(4, costs).choose(10)  # the prior again
    # acceptance is measured: rejections lower it, and depth 0 still explores now and then
    for _ in range(40):
        bad.observe(1, 0)
    assert bad.acceptance < 0.05
    # a probe drafts PROBE_STEPS (4) steps at depth 1 in a row: the first cold, the others timed
    untimed = [bad.choose(10) for _ in range(40)]
    assert [i for i, k in enumerate(untimed) if k] == [14, 15, 16, 17, 33, 34, 35, 36]  # untimed (seeded runs): every 16, no backoff (one chosen above)
    assert set(untimed) == {0, 1}
    bad.observe_time(0, 0.01)
    picks = [bad.choose(10) for _ in range(16 + 32 + 64 + 12)]
    probes = [12, 47, 114]  # timed: after 16 (3 counted above), 32, 64 depth-0 steps
    assert [i for i, k in enumerate(picks) if k] == [p + j for p in probes for j in range(4)]
    # a probe that finds drafting pays ends the backing off: the next choice drafts, the explore interval is 16 again
    bad.hits, bad.tries = 90.0, 100.0
    assert bad.choose(10) >= 1 and bad.explore_every == 16 and bad.probe_left == 0


def test_depth_policy_prices_untimed_depths_from_the_nearest_timed_one() -> None:
    """On a compute-bound model a verification of k + 1 tokens costs more than the expert-read model says:
    once depth 1 is timed at 3x a plain step, depths 2 and 3 are priced from it (not from depth 0), so a
    middling acceptance drafts nothing; from depth 0's time alone the model would have drafted."""
    from localglm.speculative import DepthPolicy, StepCosts

    costs = StepCosts(fixed=49.0, layers=5, top_k=2, n_experts=16, draft=10.0, draft_experts=2)  # the default model's shape
    policy = DepthPolicy(3, costs, hits=60, tries=100)
    policy.observe_time(0, 0.001)
    assert policy.choose(10) >= 1  # the model: a depth-1 step ~1.4x a plain one
    policy.observe_time(1, 0.003)
    assert policy.price(2) == pytest.approx(0.003 * policy._model(2) / policy._model(1))
    assert policy.price(3) == pytest.approx(0.003 * policy._model(3) / policy._model(1))
    assert policy.choose(10) == 0


def test_depth_policy_times_depth_zero_too() -> None:
    """Priced from a drafting depth's time by the model alone, depth 0 looked dearer than it is where
    multi-token steps cost more than the model says (an AVX-512 EPYC: drafting at half of plain
    decoding's speed). Once a drafting depth is timed the policy takes ZERO_PROBE_STEPS depth-0 steps
    to time them, then compares; while drafting pays it re-times depth 0 after 8, 16, ... up to
    ZERO_PROBE_EVERY drafting steps."""
    from localglm.speculative import ZERO_PROBE_EVERY, ZERO_PROBE_FIRST, ZERO_PROBE_STEPS, DepthPolicy, StepCosts

    costs = StepCosts(fixed=49.0, layers=5, top_k=2, n_experts=16, draft=10.0, draft_experts=2)  # the default model's shape
    slow = DepthPolicy(3, costs, hits=80, tries=100)
    assert slow.choose(10) >= 1  # the model's choice: untimed, it drafts
    slow.observe_time(2, 0.004)  # a depth-2 step timed: 4 ms
    assert [slow.choose(10) for _ in range(ZERO_PROBE_STEPS)] == [0] * ZERO_PROBE_STEPS
    slow.observe_time(0, 0.001)  # a plain step: 1 ms, so 2.6 tokens for 4 ms do not pay
    assert all(slow.choose(10) == 0 for _ in range(10))
    fast = DepthPolicy(3, costs, hits=80, tries=100)
    fast.observe_time(2, 0.0015)
    assert [fast.choose(10) for _ in range(ZERO_PROBE_STEPS)] == [0] * ZERO_PROBE_STEPS
    fast.observe_time(0, 0.001)
    picks = [fast.choose(10) for _ in range(400)]
    want, at, every = [], 0, ZERO_PROBE_FIRST  # re-timed after 8, 16, 32, 64, 64... drafting steps
    while at + every + ZERO_PROBE_STEPS <= len(picks):
        want += [at + every + j for j in range(ZERO_PROBE_STEPS)]
        at, every = at + every + ZERO_PROBE_STEPS, min(2 * every, ZERO_PROBE_EVERY)
    assert [i for i, k in enumerate(picks) if k == 0] == want and len(want) >= 4 * ZERO_PROBE_STEPS
    # a depth's price is the median of its last TIMING_WINDOW steps: one slow step does not move it
    for t in (0.001, 0.001, 0.001, 0.009):
        fast.observe_time(0, t)
    assert fast.seconds[0] == pytest.approx(0.001)
    seeded = DepthPolicy(3, costs, hits=80, tries=100)  # never timed (a seeded run): the model's depths alone
    assert all(seeded.choose(10) >= 1 for _ in range(2 * ZERO_PROBE_EVERY))


def test_a_probes_catch_up_is_not_priced_as_its_depth(glm4: localglm.Model) -> None:
    """After depth-0 steps the MTP block owes the pairs they left; a probe (or the first drafting step)
    catches them up outside the step clock the depth policy prices depths with: that backlog is a one-off
    price of starting to draft, and counted in the probe's time it made depth 1 look dear enough that
    the adaptive depth never drafted again. Here the backlog's catch-up burns 50 ms of CPU: no timed
    step sees it, and the tokens are plain decoding's."""
    import inspect
    import time

    spec = glm4.speculation
    assert spec is not None
    prompt = list(range(40, 60))
    ref = _plain(glm4, prompt, 30, reuse_prefix=False)
    spec.set_draft(2, adaptive=True)
    script = iter([0] * 8 + [1] + [0] * 5 + [2] * 100)
    timed: list[tuple[int, float]] = []
    backlogs: list[int] = []
    real_observe, real_catch_up = spec.policy.observe_time, spec._catch_up

    def catch_up(mcache, pend_h, pend_t):  # type: ignore[no-untyped-def]
        out = real_catch_up(mcache, pend_h, pend_t)
        if inspect.stack()[1].function == "_steps":  # the backlog, not a draft's own pairs
            backlogs.append(len(pend_t))
            t0 = time.thread_time()
            while time.thread_time() - t0 < 0.05:
                pass
        return out

    spec.policy.choose = lambda budget: min(next(script), budget)  # type: ignore[method-assign]
    spec.policy.observe_time = lambda depth, seconds: (timed.append((depth, seconds)), real_observe(depth, seconds))  # type: ignore[method-assign]
    spec._catch_up = catch_up  # type: ignore[method-assign]
    try:
        out = list(glm4.stream_tokens(prompt, max_new_tokens=30, sampling=GREEDY, reuse_prefix=False))
    finally:
        for name in ("choose", "observe_time"):
            spec.policy.__dict__.pop(name, None)
        spec.__dict__.pop("_catch_up", None)
        spec.policy.reset()
    assert out == ref
    # beyond a drafting step's own 3 pairs: the prompt's and 8 depth-0 steps' before the probe, then the
    # probe's 1-2 new tokens' and 5 depth-0 steps' before depth 2
    assert len(backlogs) == 2 and backlogs[0] == len(prompt) + 8 - 3 and backlogs[1] in (3, 4), backlogs
    # and the drafting steps right after depth-0 ones (the probe, the first depth-2 step) are not timed at all:
    # cold, they carry the block's own pairs and its weights coming back into the caches; nor are the first
    # ZERO_COLD_STEPS (4) depth-0 steps of a run of them (the main model's weights coming back)
    depths = [d for d, _ in timed]
    assert depths[:7] == [0] * 6 + [2] and max(s for _, s in timed) < 0.05  # 8 - 3 + 5 - 4 depth-0 steps, the second depth-2 step


def test_depth_policy_starts_from_remembered_prices() -> None:
    """Prices an earlier process measured stand in for the cost model (as proportions): where they said a
    drafting step costs 3 plain ones the first choice is depth 0 with probes at the remembered back-off,
    where they said 1.2 it drafts at once; once this process times steps, its own seconds rule, and what it
    leaves for the next process is its own prices (the remembered ones in its units)."""
    from localglm.speculative import EXPLORE_EVERY, PRIOR_TRIES, DepthPolicy, StepCosts
    from localglm.speculative_prices import Remembered

    costs = StepCosts(fixed=49.0, layers=5, top_k=2, n_experts=16, draft=10.0, draft_experts=2)  # the default model's shape
    assert DepthPolicy(3, costs).choose(10) >= 1  # the cost model alone drafts
    dear = DepthPolicy(3, costs)
    dear.remember(Remembered({0: 0.5, 1: 1.5, 2: 2.5, 3: 3.2}, acceptance=0.66, explore_every=128))
    assert (dear.hits, dear.tries) == (pytest.approx(0.66 * PRIOR_TRIES), PRIOR_TRIES)
    picks = [dear.choose(10) for _ in range(140)]
    assert [i for i, k in enumerate(picks) if k] == [127, 128, 129, 130]  # one probe of PROBE_STEPS after 128 depth-0 steps
    assert dear.remembered() is None  # nothing timed in this process: nothing to keep
    cheap = DepthPolicy(3, costs)
    cheap.remember(Remembered({0: 1.0, 1: 1.2}, acceptance=0.7, explore_every=EXPLORE_EVERY))
    assert cheap.choose(10) >= 1
    assert cheap.price(2) == pytest.approx(1.2 * cheap._model(2) / cheap._model(1))  # past the remembered depths: the model, scaled
    cheap.observe_time(0, 0.002)  # this process's own seconds: depth 1 from depth 0's, by the remembered 1.2
    assert cheap.price(1) == pytest.approx(0.0024)
    cheap.observe_time(1, 0.007)
    kept = cheap.remembered()
    assert kept is not None and kept.prices == {0: 0.002, 1: 0.007}
    assert cheap.choose(10) == 0
    cheap.reset()
    assert cheap.prior == {} and cheap.choose(10) == DepthPolicy(3, costs).choose(10)


def test_prices_file_round_trip_and_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One JSON file, an entry per setup and thread count, written whole (temporary file renamed), at most
    every SAVE_EVERY_S; a missing, corrupt or unwritable file is no prices, never an error."""
    from localglm.speculative_prices import ENV, SAVE_EVERY_S, PriceMemory, Remembered, default_path

    monkeypatch.setenv(ENV, str(tmp_path / "p.json"))
    assert default_path() == tmp_path / "p.json"
    monkeypatch.setenv(ENV, "off")
    assert default_path() is None
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_path() == tmp_path / "cache" / "localglm" / "mtp_prices.json"

    path = tmp_path / "sub" / "mtp_prices.json"
    a, b = PriceMemory(path, "model a"), PriceMemory(path, "model b")
    assert a.load() is None
    r = Remembered({0: 0.001, 2: 0.0031}, acceptance=0.6, explore_every=64)
    assert a.save(r, now=100.0)
    assert not a.save(Remembered({0: 1.0}, 0.1, 16), now=100.0 + SAVE_EVERY_S / 2)  # too soon: not written
    assert a.load() == r and b.load() is None
    assert b.save(Remembered({1: 0.002}, 0.5, 16), now=0.0)
    assert a.load() == r and b.load() == Remembered({1: 0.002}, 0.5, 16)
    assert [p.name for p in path.parent.iterdir()] == ["mtp_prices.json"]  # no temporary file left
    torch.set_num_threads(torch.get_num_threads() + 1)
    try:
        assert a.load() is None  # another thread count: another entry
    finally:
        torch.set_num_threads(torch.get_num_threads() - 1)
    entries = json.loads(path.read_text())["entries"]
    entries[a.key()]["prices"] = {"0": "fast"}
    path.write_text(json.dumps({"version": 1, "entries": entries}))
    assert a.load() is None and b.load() is not None  # a bad entry: ignored
    path.write_text("{not json")
    assert a.load() is None
    blocked = PriceMemory(tmp_path / "file" / "p.json", "x")
    (tmp_path / "file").write_text("")  # a file where the folder would go
    assert not blocked.save(r)


def test_policy_settles_off_where_drafting_keeps_not_paying() -> None:
    """settled_off (the engine then decodes without speculation): never with nothing measured or remembered, nor for
    a fixed depth; at depth 0 once the probes' back-off is at its longest; at once where not even a perfect
    acceptance would pay (such a policy never probes, so its back-off never grows)."""
    from localglm.speculative import EXPLORE_MAX, DepthPolicy, StepCosts

    costs = StepCosts(fixed=49.0, layers=5, top_k=2, n_experts=16, draft=10.0, draft_experts=2)
    assert not DepthPolicy(3, costs).settled_off() and not DepthPolicy(3, costs, fixed=True).settled_off()
    dear = DepthPolicy(3, costs)  # a drafting step 1.5-3x a plain one, acceptance 1 in 2: depth 0, but 4 tokens at 3x would pay
    for k, t in {0: 1.0, 1: 1.5, 2: 2.2, 3: 3.0}.items():
        dear.observe_time(k, t)
    assert dear.choose(10) == 0 and not dear.settled_off()
    dear.explore_every = EXPLORE_MAX
    assert dear.settled_off()
    hopeless = DepthPolicy(3, costs)  # drafting 10x a plain step: no acceptance pays
    for k, t in {0: 1.0, 1: 10.0, 2: 11.0, 3: 12.0}.items():
        hopeless.observe_time(k, t)
    assert hopeless.explore_every < EXPLORE_MAX and hopeless.settled_off()
    hopeless.hits, hopeless.tries = 1000.0, 1000.0
    assert hopeless.settled_off()


def test_a_new_process_starts_from_the_last_ones_prices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load() gives the model its setup's entry; an unseeded generation with the adaptive depth starts from
    it and leaves what it timed; a seeded one neither reads nor writes; the same tokens either way."""
    from localglm.speculative_prices import ENV, Remembered

    monkeypatch.setenv(ENV, str(tmp_path / "prices.json"))
    path = make_tiny(tmp_path / "m", SPECS["glm4_moe"])
    model = localglm.load(path)
    spec = model.speculation
    assert spec is not None and spec.memory is not None and spec.memory.path == tmp_path / "prices.json"
    prompt = list(range(20, 45))
    plain = _plain(model, prompt, 24)
    spec.set_draft(2, adaptive=True)
    seeded = SamplingParams(temperature=0, seed=1)
    stats = GenerationStats()
    assert list(model.stream_tokens(prompt, max_new_tokens=24, sampling=seeded, reuse_prefix=False, stats=stats)) == plain
    assert not (tmp_path / "prices.json").exists() and stats.draft_tokens == 0  # seeded, adaptive: the plain loop
    warm = SamplingParams(temperature=0.7, seed=5)
    spec.set_draft(0)
    off = list(model.stream_tokens(prompt, max_new_tokens=24, sampling=warm, reuse_prefix=False))
    spec.set_draft(2, adaptive=True)
    assert list(model.stream_tokens(prompt, max_new_tokens=24, sampling=warm, reuse_prefix=False)) == off  # as --no-mtp's, seed for seed
    assert list(model.stream_tokens(prompt, max_new_tokens=24, sampling=GREEDY, reuse_prefix=False)) == plain
    kept = spec.memory.load()
    assert kept is not None and kept == spec.policy.remembered()
    # a new process (a fresh load): its policy starts from that entry
    again = localglm.load(path)
    assert again.speculation is not None and again.speculation.memory.key() == spec.memory.key()
    again.speculation.set_draft(2, adaptive=True)
    spec.memory.saved_at = float("-inf")
    spec.memory.save(Remembered({0: 1.0, 1: 9.0, 2: 17.0}, acceptance=0.5, explore_every=256))  # drafting never paid
    seen = []
    real = again.speculation.policy.choose
    again.speculation.policy.choose = lambda budget: seen.append(real(budget)) or seen[-1]  # type: ignore[method-assign]
    assert list(again.stream_tokens(prompt, max_new_tokens=24, sampling=GREEDY, reuse_prefix=False)) == plain
    # settled on depth 0 from the start: the plain loop decodes (no depth-0 steps' bookkeeping), counting toward a retry
    assert again.speculation.policy.prior == {0: 1.0, 1: 9.0, 2: 17.0} and seen == [] and again.speculation.skipped == 24
    again.speculation.skipped = RETRY_AFTER  # enough tokens without speculation: the next generation tries, probing at once
    assert list(again.stream_tokens(prompt, max_new_tokens=24, sampling=GREEDY, reuse_prefix=False)) == plain
    assert seen[0] == 1 and again.speculation.skipped == 0
    # another load option is another setup
    assert localglm.load(path, draft=1).speculation.memory.key() != spec.memory.key()


# ---- interfaces -----------------------------------------------------------------------------------


def _spec_stats() -> GenerationStats:
    return GenerationStats(
        prompt_tokens=10, decode_tokens=9, finish_reason="length", draft_tokens=8, accepted_tokens=5, acceptance_length=2.25, draft_depths={0: 1, 2: 3}
    )


def test_cli_flags_and_stats_json(glm4: localglm.Model, capsys: pytest.CaptureFixture) -> None:
    from localglm.cli import main

    base = ["generate", str(glm4.path), "-p", "def f(", "-n", "8", "--temperature", "0", "--ignore-eos", "--stats-json", "-q", "--threads", "1"]
    assert main(base + ["--draft", "2"]) == 0
    out = capsys.readouterr()
    stats = json.loads(out.out.strip().splitlines()[-1])
    assert stats["draft_tokens"] <= sum(int(d) * n for d, n in stats["draft_depths"].items())  # a veto may stop a draft early
    assert sum(stats["draft_depths"].values()) >= 1 and 1.0 <= stats["acceptance_length"] <= 3.0
    assert 0 <= stats["accepted_tokens"] <= stats["draft_tokens"]
    assert "mtp:" in out.err
    assert main(base + ["--no-mtp"]) == 0
    assert "draft_tokens" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(base + ["--draft", "17"]) == 2  # a usage error
    assert "--draft 17" in capsys.readouterr().err
    assert main(base + ["--no-mtp", "--draft-fixed"]) == 2
    assert "--draft-fixed" in capsys.readouterr().err


def test_a_fixed_depth_drafts_in_a_seeded_run_and_reproduces_it(glm4: localglm.Model, capsys: pytest.CaptureFixture) -> None:
    """--draft-fixed (load's draft_fixed): every step drafts N (the last ones as many as the budget leaves), a seeded
    sampled run speculates, and it gives the same tokens twice; without it a seeded run decodes without drafts."""
    from localglm.cli import main

    base = ["generate", str(glm4.path), "-p", "def f(", "-n", "9", "--temperature", "0.8", "--seed", "7", "--ignore-eos", "--stats-json",
            "-q", "--threads", "1", "--draft", "2"]  # fmt: skip
    runs = []
    for _ in range(2):
        assert main([*base, "--draft-fixed"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        runs.append((out[:-1], json.loads(out[-1])))
    speculation = ("draft_tokens", "accepted_tokens", "draft_depths")
    assert runs[0][0] == runs[1][0] and [runs[0][1][k] for k in speculation] == [runs[1][1][k] for k in speculation]
    depths = {int(d): n for d, n in runs[0][1]["draft_depths"].items()}
    assert set(depths) <= {1, 2} and depths.get(2, 0) >= 1 and runs[0][1]["draft_tokens"] >= 2
    assert main(base) == 0  # the adaptive depth: a seeded run is plain decoding
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]).get("draft_tokens", 0) == 0
    model = localglm.load(glm4.path, draft=2, draft_fixed=True)
    assert model.speculation is not None and model.speculation.policy.fixed
    with pytest.raises(localglm.LocalGLMError, match="draft_fixed="):
        localglm.load(glm4.path, draft_fixed="yes")


def test_server_metrics_count_drafts() -> None:
    from types import SimpleNamespace

    from localglm.engine import Done
    from localglm.server.metrics import Metrics

    m = Metrics("glm", 128)
    job = SimpleNamespace(cancel=SimpleNamespace(is_set=lambda: False), started_at=None, enqueued_at=0.0)
    for _ in range(2):
        m.on_finish(job, Done(finish_reason="length", stats=_spec_stats()))  # type: ignore[arg-type]
    text = m.render(SimpleNamespace(waiting=0, max_waiting=4, busy=False))  # type: ignore[arg-type]
    assert "localglm_draft_tokens_total 16" in text and "localglm_accepted_tokens_total 10" in text
    assert "localglm_acceptance_length 2.25" in text  # (10 accepted + 8 steps) / 8 steps
    assert 'localglm_draft_steps_total{depth="2"} 6' in text


def test_chat_stats_panel_shows_drafts() -> None:
    from rich.console import Console

    from tui.widgets import StatsPanel

    shown: list[Any] = []
    panel = StatsPanel(ctx_limit=100)
    panel.update = shown.append  # type: ignore[method-assign]  # what the panel would display

    def text() -> str:
        console = Console(width=60, record=True)
        console.print(shown[-1])
        return console.export_text()

    panel.show_final(_spec_stats())
    assert "5/8 accepted" in text() and "2.25 tok" in text()
    panel.show_final(GenerationStats(prompt_tokens=3, decode_tokens=2, finish_reason="stop"))
    assert "accepted" not in text() and "decode" in text()
