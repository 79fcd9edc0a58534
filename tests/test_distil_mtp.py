"""Self-distilling the MTP block (localglm/training/distil_mtp.py) on a tiny trained checkpoint: the
block alone learns, only its tensors change on disk, and the result loads and drafts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import localglm
from localglm.training.distil_mtp import (
    DistilConfig,
    batch_rows,
    distil,
    distil_block,
    train_config_of,
)
from localglm.training.warm_start import read_stored_tensors

pytest.importorskip("transformers")

from test_training import TINY, _tiny_corpus

REQUESTS = ["Write a function that wraps text.", "Insert an item into a sorted list.", "Split a shell command line.", "Pop the smallest item from a heap."]
CFG = DistilConfig(requests=4, request_tokens=12, reply_tokens=16, steps=30, batch_size=4, lr=1e-2, warmup=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from localglm.training.train import train

    root = tmp_path_factory.mktemp("distil")
    train(TINY, root / "model", root / "work", corpus=_tiny_corpus(), save_every=1000, eval_windows=2, log=lambda _m: None)
    return root / "model"


def _replies(path: Path) -> list[tuple[list[int], int]]:
    from localglm.training.distil_mtp import greedy_replies

    return greedy_replies(localglm.load(path, mtp=False), REQUESTS, CFG, lambda _m: None)


def _kl(model: torch.nn.Module, seqs: list[tuple[list[int], int]], pad: int) -> float:
    """KL(main || block) over all the replies at once: the distillation loss less the main model's entropy."""
    import torch.nn.functional as F

    from localglm.training.mtp import PreNormHidden, mtp_logits

    rows, mask = batch_rows(seqs, pad)
    L = rows.shape[1]
    cap = PreNormHidden(model)
    with torch.no_grad():
        logits = model(rows).logits
        draft = mtp_logits(model, cap.value[:, : L - 2], rows[:, 1 : L - 1])
    cap.close()
    logp = F.log_softmax(logits[:, 1 : L - 1].float(), -1)
    kl = (logp.exp() * (logp - F.log_softmax(draft.float(), -1))).sum(-1)
    return float((kl * mask).sum() / mask.sum())


def test_the_block_alone_learns_the_main_models_predictions(trained: Path) -> None:
    from localglm.training.train import build_model
    from localglm.training.warm_start import load_into, special_ids

    special = special_ids(trained / "tokenizer.json")
    model = build_model(TINY, special)
    load_into(model, trained)
    main_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(f"model.layers.{TINY.num_hidden_layers}.")}
    seqs = _replies(trained)
    pad = special["<|endoftext|>"]
    before = _kl(model, seqs, pad)
    run = distil_block(model, seqs, CFG, pad, lambda _m: None)
    after = _kl(model, seqs, pad)
    assert after < 0.7 * before, (before, after)
    assert [h["step"] for h in run["history"]] == [25, 30]
    for n, p in model.named_parameters():  # the main model is the teacher: untouched
        if n in main_before:
            assert torch.equal(p, main_before[n]), n
    assert not any(p.requires_grad for p in model.parameters())


def test_only_the_block_changes_on_disk_and_the_result_drafts(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "distilled"
    record = distil(trained, out, CFG, log=lambda _m: None, eval_requests=2, requests=REQUESTS)
    old, new = read_stored_tensors(trained), read_stored_tensors(out)
    assert set(old) == set(new)
    block = f"model.layers.{TINY.num_hidden_layers}."
    changed = {n for n in old if not torch.equal(old[n], new[n])}
    assert changed and all(n.startswith(block) for n in changed), sorted(changed)[:4]
    assert all(old[n].dtype == new[n].dtype for n in old)  # fp8 weights stay fp8, with their scales
    assert any(n.endswith("eh_proj.weight") for n in changed)
    meta = json.loads((out / "localglm_training.json").read_text())
    assert meta["mtp_distillation"]["config"]["steps"] == CFG.steps and meta["train_config"]["hidden_size"] == TINY.hidden_size
    assert set(record["acceptance_after"]) == {1, 3}
    m = localglm.load(out, mtp=True)
    m.speculation.set_draft(2, adaptive=False)
    from localglm.sampling import SamplingParams

    ids = m.encode_chat([{"role": "user", "content": REQUESTS[0]}]).ids
    spec = list(m.stream_tokens(ids, max_new_tokens=12, sampling=SamplingParams(temperature=0), reuse_prefix=False))
    m.speculation.set_draft(0)
    plain = list(m.stream_tokens(ids, max_new_tokens=12, sampling=SamplingParams(temperature=0), reuse_prefix=False))
    assert spec == plain


def test_a_checkpoint_not_trained_here_is_a_one_line_error(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localglm.training.distil_mtp import main

    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    (bare / "localglm_training.json").unlink()
    with pytest.raises(ValueError, match="localglm_training.json"):
        train_config_of(bare)
    assert main(["--model", str(bare), "--out", str(tmp_path / "out"), "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "localglm_training.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps 0: must be a number of at least 1"),
        (["--lr", "nan"], "--lr nan: must be a number of at least 0"),
        (["--batch-size", "0"], "--batch-size 0: must be a number of at least 1"),
        (["--reply-tokens", "-1"], "--reply-tokens -1: must be a number of at least 1"),
        (["--eval-requests", "-1"], "--eval-requests -1: must be at least 0"),
        (["--threads", "-1"], "--threads -1: must be at least 1"),
    ],
)  # fmt: skip
def test_cli_refuses_settings_that_cannot_distil(flags: list[str], message: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from localglm.training.distil_mtp import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", str(trained), "--out", str(tmp_path / "out"), *flags])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert not (tmp_path / "out").exists()
