"""Prompts set aside for conversations that take turns (localglm/prompt_cache.py).

A conversation interrupted by another (an agent's subagent, a side request) gets its cache back:
the next turn prefills only what is new, and produces exactly what it would have produced
uninterrupted, for every cache layout (GQA, MLA, MLA + DSA), in bf16 and fp32, with and without
speculative decoding (whose MTP cache and kept streams travel with the main cache's rows).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
import pytest
import torch

import localglm
from localglm.layers.kv_cache import CacheSnapshot
from localglm.models.glm4_moe.tiny import TinySpec as Glm4Spec
from localglm.models.glm4_moe_lite.tiny import TinySpec as LiteSpec
from localglm.models.glm_moe_dsa.tiny import TinySpec as DsaSpec
from localglm.prompt_cache import PromptCache, SavedPrompt, prompt_cache_for
from localglm.sampling import SamplingParams
from localglm.server import ServerSettings, create_app
from localglm.server.testing import ServerThread
from localglm.stats import GenerationStats
from localglm.tiny import make_tiny

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0)
DSA = DsaSpec(dtype="float32", index_topk=6)  # prompts longer than the top-k: selection active
# name: (checkpoint, load options)
SETUPS: dict[str, tuple[Any, dict[str, Any]]] = {
    "glm4_moe-bf16": (Glm4Spec(), {}),
    "glm4_moe": (Glm4Spec(dtype="float32"), {}),
    "glm4_moe_lite": (LiteSpec(dtype="float32"), {}),
    "glm_moe_dsa": (DSA, {}),
    # offloaded experts, the latent rows in (simulated pinned) host RAM: GLM-5's long-context layout
    "glm_moe_dsa-offloaded": (DSA, {"offload": "sim", "gpu_mem": "64MiB", "kv": "ram"}),
}


@pytest.fixture(scope="module", params=list(SETUPS))
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    spec, options = SETUPS[request.param]
    return make_tiny(tmp_path_factory.mktemp(request.param) / "m", spec), options


def _run(model: localglm.Model, ids: list[int], n: int, stats: GenerationStats | None = None) -> list[int]:
    return list(model.stream_tokens(ids, max_new_tokens=n, sampling=GREEDY, stats=stats))


def _turns(vocab: int) -> tuple[list[int], list[int], list[int]]:
    """Conversation A's first prompt, another conversation B, and A's continuation (A + more)."""
    g = torch.Generator().manual_seed(11)
    a, b, more = (torch.randint(0, min(vocab, 400), (n,), generator=g).tolist() for n in (70, 50, 9))
    return a, b, more


def _draft(model: localglm.Model, depth: int | None) -> None:
    spec = model.speculation
    if depth is None:
        assert spec is None
    else:
        assert spec is not None
        spec.set_draft(depth, adaptive=False)


@pytest.mark.parametrize("draft", [None, 2])
def test_a_conversation_gets_its_cache_back_after_another_took_a_turn(arch_dir: tuple[Path, dict[str, Any]], draft: int | None) -> None:
    path, options = arch_dir
    mtp = draft is not None
    ref_model = localglm.load(path, mtp=mtp, **options)
    _draft(ref_model, draft)
    a, b, more = _turns(ref_model.config.vocab_size)
    first = _run(ref_model, a, 12)
    a2 = a + first + more
    ref_stats = GenerationStats()
    ref = _run(ref_model, a2, 10, ref_stats)  # uninterrupted: the live cache's prefix
    assert ref_stats.cached_prompt_tokens == len(a) + 11  # the last generated token was never fed back

    model = localglm.load(path, mtp=mtp, **options)
    _draft(model, draft)
    model.prompt_cache = PromptCache(1 << 30)
    assert _run(model, a, 12) == first
    _run(model, b, 5)  # another conversation overwrites the live cache: A's is set aside first
    assert len(model.prompt_cache.entries) == 1 and model.prompt_cache.entries[0].tokens[: len(a)] == tuple(a)
    stats = GenerationStats()
    assert _run(model, a2, 10, stats) == ref  # bit for bit what the uninterrupted conversation gives
    assert stats.cached_prompt_tokens == ref_stats.cached_prompt_tokens and stats.restored_prompt_tokens == len(a) + 11
    assert model.prompt_cache.restores == 1 and len(model.prompt_cache.entries) == 2  # B's was set aside in turn
    if mtp:
        assert stats.draft_tokens > 0

    # Without the saved prompts the same interruption costs A its prefix.
    model.prompt_cache = None
    _run(model, b, 5)
    stats = GenerationStats()
    _run(model, a2, 10, stats)
    assert stats.cached_prompt_tokens < 5


def _saved(tokens: list[int], nbytes: int) -> SavedPrompt:
    return SavedPrompt(CacheSnapshot(tuple(tokens), [torch.zeros(nbytes, dtype=torch.uint8)]))


def test_the_store_keeps_the_longest_match_within_its_budget(caplog: pytest.LogCaptureFixture) -> None:
    store = PromptCache(budget=1000, min_tokens=4)
    store.put(_saved([1, 2, 3, 4, 5], 300))
    store.put(_saved([9, 9, 9, 9], 300))
    assert store.longest_prefix([1, 2, 3, 7]) == (store.entries[0], 3)
    assert store.longest_prefix([5, 5]) == (None, 0)
    store.put(_saved([1, 2, 3, 4, 5, 6, 7], 300))  # extends the first: it replaces it
    assert [len(e.tokens) for e in store.entries] == [4, 7] and store.covers([1, 2, 3]) and not store.covers([1, 2, 4])
    store.touch(store.entries[0], 4)  # [9,9,9,9] becomes the most recent
    store.put(_saved([5, 6, 7, 8], 300))
    store.put(_saved([4, 4, 4, 4], 300))  # over budget: the least recently used goes first
    assert [e.tokens[0] for e in store.entries] == [9, 5, 4] and store.nbytes == 900
    with caplog.at_level(logging.WARNING, logger="localglm"):
        assert not store.put(_saved([3, 3, 3, 3], 1001)) and len(store.entries) == 3  # alone over the budget: not kept
        assert not store.put(_saved([2, 2, 2, 2], 1001))
    assert store.refused == 2 and len(caplog.records) == 1 and "--cache-ram" in caplog.records[0].getMessage()  # said once
    assert store.restores == 1 and store.restored_tokens == 4


@pytest.mark.parametrize(
    "held,kept,save", [(100, 0, True), (100, 80, False), (100, 74, False), (200, 140, True), (1000, 990, False), (20, 0, False), (1000, 700, True)]
)
def test_a_live_cache_is_set_aside_when_a_prompt_would_overwrite_much_of_it(held: int, kept: int, save: bool) -> None:
    """An agent's next turn drops only the tail of its last reply (the template re-renders it): not worth a copy."""
    assert PromptCache(budget=1 << 20, min_tokens=32).worth_saving(held, kept) is save


def test_serve_sets_the_store_up_and_reports_it(tiny_dir: Path) -> None:
    import httpx

    model = localglm.load(tiny_dir)
    for ram, expect in ((0, None), (2**20, 2**20), (None, -1)):
        app = create_app(model, ServerSettings(model_name="t", cache_ram_bytes=ram))
        if expect is None:
            assert model.prompt_cache is None
            continue
        assert model.prompt_cache is not None and (expect < 0 or model.prompt_cache.budget == expect)
        with ServerThread(app) as srv:
            text = httpx.get(srv.base_url + "/metrics").text
        assert "localglm_prompt_cache_restores_total 0" in text and "localglm_prompt_cache_budget_bytes" in text
    create_app(model, ServerSettings(model_name="t", reuse_prefix=False))
    assert model.prompt_cache is None  # --no-prefix-reuse: nothing is reused, nothing set aside


def test_serve_refuses_a_bad_cache_ram_before_loading(tiny_dir: Path) -> None:
    from tests.probes import run_cli

    o = run_cli("serve", tiny_dir, "--cache-ram", "lots")
    assert o.kind == "clean" and "--cache-ram" in o.err and len(o.err.strip().splitlines()) == 1, o.why()


def test_the_chat_app_keeps_the_chats_you_switch_between(tiny_dir: Path) -> None:
    from tui.app import ChatOptions, default_loader

    for ram, expect in ((2**20, 2**20), (0, None)):
        model = default_loader(ChatOptions(model_path=str(tiny_dir), ctx=256, cache_ram=ram))(lambda *a: None)
        assert (model.prompt_cache.budget if model.prompt_cache else None) == expect


def test_reopening_a_chat_in_the_app_restores_its_cache(tiny_dir: Path, tmp_path: Path) -> None:
    """The chat app end to end: chat one, a new chat, back to chat one (Ctrl+O): its next turn starts from
    the saved cache, not a prefill of the whole chat."""
    from tests.test_tui import drive, forcing, make_app, send, wait_for
    from tui.screens import ConversationsScreen

    model = localglm.load(tiny_dir, ctx=512)
    model.prompt_cache = PromptCache(1 << 30)
    app = make_app(tmp_path, model, logits_processor=forcing(model, "reply one", "reply two", "reply three"))
    long_message = "please explain how the tokenizer splits words into pieces " * 4

    async def script(pilot: Any) -> None:
        screen = await send(pilot, long_message)
        first_id = screen.conversation.id
        first_prompt = model.last_stats.prompt_tokens
        await pilot.press("ctrl+n")
        await pilot.pause()
        await send(pilot, "second chat")
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        await pilot.pause()
        await pilot.press("down", "enter")
        await wait_for(pilot, lambda: app.screen is screen and screen.conversation.id == first_id)
        await send(pilot, "more")
        stats = model.last_stats
        assert stats.restored_prompt_tokens >= first_prompt and stats.cached_prompt_tokens >= first_prompt

    drive(app, script)
    assert model.prompt_cache.restores == 1


# ---- on disk (prompt_disk.py) ----------------------------------------------------------------------
def _with_disk(model: localglm.Model, root: Path, ram: int = 1 << 30, disk: int | None = None) -> PromptCache:
    store = prompt_cache_for(ram, disk_dir=root, disk_budget=disk, setup=model.setup)
    assert store is not None and store.disk is not None
    model.prompt_cache = store
    return store


def test_a_restarted_process_restores_a_conversation_from_disk(arch_dir: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """A (with the MTP block's state) and B on disk when the first process stops; a second process's next
    turn of A reads A's file and produces bit for bit what the uninterrupted conversation gives."""
    path, options = arch_dir
    ref_model = localglm.load(path, mtp=True, **options)
    _draft(ref_model, 2)
    a, b, more = _turns(ref_model.config.vocab_size)
    first = _run(ref_model, a, 12)
    a2 = a + first + more
    ref = _run(ref_model, a2, 10)

    model = localglm.load(path, mtp=True, **options)
    _draft(model, 2)
    _with_disk(model, tmp_path)
    assert _run(model, a, 12) == first
    _run(model, b, 5)
    assert model.keep_prompts() == 2  # A (set aside in RAM) and B (the live cache)
    files = sorted(p.name for p in model.prompt_cache.disk.dir.iterdir())
    assert len(files) == 3 and "setup.txt" in files and not any(f.endswith(".tmp") for f in files)

    again = localglm.load(path, mtp=True, **options)
    _draft(again, 2)
    store = _with_disk(again, tmp_path)
    assert again.setup == model.setup and len(store.disk.entries) == 2 and not store.entries
    stats = GenerationStats()
    assert _run(again, a2, 10, stats) == ref
    assert stats.restored_prompt_tokens == len(a) + 11 and store.disk.loads == 1 and stats.draft_tokens > 0

    other = localglm.load(path, mtp=True, dtype="float32" if again.dtype != torch.float32 else "bfloat16", **options)
    assert other.setup != again.setup and _with_disk(other, tmp_path).disk.dir != store.disk.dir  # rows of another setup are not used


def test_what_ram_lets_go_is_written_to_disk_within_its_budget(tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = localglm.load(tiny_dir)
    store = _with_disk(model, tmp_path, ram=1, disk=1 << 20)
    disk = store.disk
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 400, (40,), generator=g).tolist() for _ in range(4)]
    for p in prompts:
        _run(model, p, 2)
    disk.flush()
    # a cache larger than all of --cache-ram goes straight to disk (before, it was refused and lost)
    assert not store.entries and store.refused == 0 and len(disk.entries) == 3
    assert {e.tokens[:40] for e in disk.entries} == {tuple(p) for p in prompts[:3]}
    stats = GenerationStats()
    _run(model, prompts[0] + [7, 7], 2, stats)
    assert stats.restored_prompt_tokens == 40 and disk.loads == 1

    # the budget: the least recently used files are deleted first; a file it extends replaces one
    size = disk.entries[0].nbytes
    disk.budget = 2 * size + size // 2
    disk.save(store.entries[-1].kv if store.entries else SavedPrompt(model._cache.snapshot()).kv)
    disk.flush()
    assert len(disk.entries) == 2 and sum(e.nbytes for e in disk.entries) <= disk.budget
    assert len(list(disk.dir.glob("*.safetensors"))) == 2
    old = disk.entries[0]
    snap, _ = disk.load(old)
    disk.save(CacheSnapshot((*snap.tokens, 1, 2), snap.parts))  # extends it: the old file goes
    disk.flush()
    assert old not in disk.entries and not old.path.exists() and len(list(disk.dir.glob("*.safetensors"))) == 2

    # a prompt larger than the whole budget is not written (it would be deleted at once), with one warning
    writes, disk.budget = disk.writes, size // 2
    with caplog.at_level(logging.WARNING, logger="localglm"):
        disk.save(CacheSnapshot((*snap.tokens, 3), snap.parts))
        disk.save(CacheSnapshot((*snap.tokens, 4), snap.parts))
        disk.flush()
    assert disk.writes == writes and disk.refused == 2 and len(list(disk.dir.glob("*.safetensors"))) == 2
    assert sum("larger than --cache-disk" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()

    # a damaged file is skipped with a warning, and left where it is
    victim = disk.entries[0].path
    victim.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="localglm"):
        reread = _with_disk(localglm.load(tiny_dir), tmp_path, ram=1, disk=1 << 20)
    assert len(reread.disk.entries) == 1 and victim.exists()
    assert any(str(victim) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["draft-list", "nan-rows"])
def test_a_file_whose_metadata_or_rows_are_damaged_is_skipped(damage: str, tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A saved prompt whose metadata has the wrong shape ("draft": [1]) made every request with its prefix a 500
    (TypeError), and one whose rows hold NaN a permanent 422 blaming the weights (found by a hostile-input
    sweep); both are now skipped with the usual warning, and the prompt is prefilled."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    prompt = torch.randint(0, 400, (40,), generator=torch.Generator().manual_seed(8)).tolist()
    ref = _run(localglm.load(tiny_dir), prompt + [5], 4)
    model = localglm.load(tiny_dir)
    store = _with_disk(model, tmp_path, ram=1)
    _run(model, prompt, 2)
    model.keep_prompts()
    store.disk.flush()
    (entry,) = store.disk.entries
    with safe_open(str(entry.path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if damage == "draft-list":
        meta["localglm"] = json.dumps({**json.loads(meta["localglm"]), "draft": [1]})
    else:
        tensors["kv.0"] = torch.full_like(tensors["kv.0"], float("nan"))
    save_file(tensors, str(entry.path), metadata=meta)
    again = localglm.load(tiny_dir)
    store = _with_disk(again, tmp_path, ram=1)
    assert len(store.disk.entries) == 1
    with caplog.at_level(logging.WARNING, logger="localglm"):
        assert _run(again, prompt + [5], 4) == ref
    assert store.disk.failed == 1 and any("saved prompt not used" in r.getMessage() for r in caplog.records)


def test_a_costly_prompt_is_on_disk_before_the_process_stops(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --cache-dir, a prompt whose uncovered tokens would take WRITE_PROMPT_AFTER_S to compute again is
    written at once (a killed server keeps it), and a later process restores it; a turn that adds little after
    a saved prefix is not written again."""
    import localglm.engine as engine_mod

    model = localglm.load(tiny_dir)
    store = _with_disk(model, tmp_path)
    a, _, more = _turns(model.config.vocab_size)
    monkeypatch.setattr(engine_mod, "WRITE_PROMPT_AFTER_S", 0.0)  # every prompt is "costly"
    first = _run(model, a, 6)
    store.disk.flush()
    assert store.disk.writes == 1 and len(store.disk.entries) == 1
    assert store.disk.entries[0].tokens == tuple(a + first[:-1])  # the live cache: the prompt and what was decoded
    monkeypatch.setattr(engine_mod, "WRITE_PROMPT_AFTER_S", 1e9)  # nothing is worth writing now
    _run(model, a + first + more, 3)
    store.disk.flush()
    assert store.disk.writes == 1

    again = localglm.load(tiny_dir)  # no keep_prompts(): as after a kill
    _with_disk(again, tmp_path)
    stats = GenerationStats()
    assert _run(again, a + first + more, 3, stats) == _run(localglm.load(tiny_dir), a + first + more, 3)
    assert stats.restored_prompt_tokens == len(a) + len(first) - 1


def test_two_processes_share_one_cache_dir(tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each uses the files the other wrote and counts them in its budget; a file the other deleted is
    prefilled without a warning; a temporary file a killed writer left is deleted once stale."""
    import os
    import time

    from localglm.prompt_disk import PromptDisk

    model = localglm.load(tiny_dir)
    g = torch.Generator().manual_seed(8)
    p1, p2 = (torch.randint(0, 400, (40,), generator=g).tolist() for _ in range(2))
    _run(model, p1, 2)
    snap1 = model._cache.snapshot()
    _run(model, p2, 2)
    snap2 = model._cache.snapshot()
    one, two = PromptDisk(tmp_path, 1 << 30, model.setup), PromptDisk(tmp_path, 1 << 30, model.setup)
    one.save(snap1)
    one.flush()
    found, n = two.longest_prefix(p1 + [5])
    assert n == 40 and found is not None and two.load(found) is not None  # written by the other
    size = one.entries[0].nbytes
    two.budget = size + size // 2  # room for one file: two's own write deletes one's file
    two.save(snap2)
    two.flush()
    assert len(two.entries) == 1 and two.entries[0].tokens[:40] == tuple(p2)
    assert len(list(two.dir.glob("*.prompt.safetensors"))) == 1
    stale = one.entries[0]
    with caplog.at_level(logging.WARNING, logger="localglm"):
        assert one.load(stale) is None and one.failed == 0
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)
    assert one.longest_prefix(p2)[1] == 40 and stale not in one.entries

    # a lookup lists the directory only when its mtime moved (or is too recent to trust)
    listed: list[int] = []
    real_glob = type(one.dir).glob
    monkeypatch.setattr(type(one.dir), "glob", lambda self, pat: listed.append(1) or real_glob(self, pat))
    an_hour_ago = time.time() - 3600
    os.utime(one.dir, (an_hour_ago, an_hour_ago))
    one.longest_prefix(p2)
    one.longest_prefix(p2)
    assert len(listed) == 1
    (one.dir / "note.txt").write_text("a file came")  # the directory's mtime moves: listed again
    one.longest_prefix(p2)
    assert len(listed) == 2
    monkeypatch.undo()

    old_tmp, new_tmp = one.dir / ".killed.tmp", one.dir / ".writing.tmp"
    old_tmp.write_bytes(b"half a file")
    new_tmp.write_bytes(b"a write in progress")
    hours_ago = time.time() - 2 * 3600
    os.utime(old_tmp, (hours_ago, hours_ago))
    PromptDisk(tmp_path, 1 << 30, model.setup)
    assert not old_tmp.exists() and new_tmp.exists()


def test_a_restarted_chat_app_restores_a_chat_from_cache_dir(tiny_dir: Path, tmp_path: Path) -> None:
    """`localglm chat --cache-dir`: the chat's cache is written when the app ends (ChatApp.keep_chats); a new
    app on a new model opens the saved chat (Ctrl+O) and its next turn reads the cache back instead of
    prefilling the whole chat."""
    from tests.test_tui import drive, forcing, make_app, send, wait_for
    from tui.app import ChatOptions, default_loader
    from tui.screens import ConversationsScreen

    options = ChatOptions(model_path=str(tiny_dir), ctx=512, max_new_tokens=24, cache_dir=tmp_path / "prompts", cache_disk=1 << 26)
    model = default_loader(options)(lambda *a: None)
    assert model.prompt_cache.disk is not None and model.prompt_cache.disk.budget == 1 << 26
    app = make_app(tmp_path, model, options=options, logits_processor=forcing(model, "reply one"))
    first: dict[str, int] = {}

    async def chat_once(pilot: Any) -> None:
        await send(pilot, "please explain how the tokenizer splits words into pieces " * 4)
        first["prompt"] = model.last_stats.prompt_tokens

    drive(app, chat_once)
    assert app.keep_chats() is not None and len(model.prompt_cache.disk.entries) == 1

    again = default_loader(options)(lambda *a: None)  # the next start
    assert len(again.prompt_cache.disk.entries) == 1 and not again.prompt_cache.entries
    app2 = make_app(tmp_path, again, options=options, logits_processor=forcing(again, "reply two"))

    async def reopen(pilot: Any) -> None:
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app2.screen, ConversationsScreen))
        await pilot.pause()
        await pilot.press("enter")
        await wait_for(pilot, lambda: not isinstance(app2.screen, ConversationsScreen))
        await send(pilot, "more")
        stats = again.last_stats
        assert stats.restored_prompt_tokens >= first["prompt"] and stats.cached_prompt_tokens >= first["prompt"]

    drive(app2, reopen)
    assert again.prompt_cache.disk.loads == 1


def test_a_file_whose_rows_do_not_fit_is_prefilled_and_forgotten(tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file in the setup's directory with rows of another shape (copied in by hand, say): the prompt is
    prefilled with the right output, the file is left where it is and not read again."""
    from safetensors.torch import load_file, save_file

    model = localglm.load(tiny_dir)
    store = _with_disk(model, tmp_path)
    g = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, 400, (40,), generator=g).tolist()
    want = _run(model, prompt + [5, 6], 3)
    model.keep_prompts()
    (entry,) = store.disk.entries
    tensors = load_file(entry.path)
    tensors["kv.0"] = tensors["kv.0"][..., :1].contiguous()  # the wrong width
    from safetensors import safe_open

    with safe_open(str(entry.path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(entry.path), metadata=meta)

    again = localglm.load(tiny_dir)
    reread = _with_disk(again, tmp_path)
    with caplog.at_level(logging.WARNING, logger="localglm"):
        stats = GenerationStats()
        assert _run(again, prompt + [5, 6], 3, stats) == want and stats.restored_prompt_tokens == 0
    assert not reread.disk.entries and not reread.entries and entry.path.exists()
    assert any("do not fit" in r.getMessage() for r in caplog.records)


def test_the_finite_check_sees_every_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved prompt's rows are checked a slice at a time (bounded memory): a NaN in the last slice still counts."""
    from localglm import prompt_disk

    monkeypatch.setattr(prompt_disk, "FINITE_CHECK_ELEMENTS", 4)
    rows = torch.zeros(2, 5, dtype=torch.bfloat16)
    assert prompt_disk._all_finite(rows)
    rows[1, 4] = float("inf")
    assert not prompt_disk._all_finite(rows)
