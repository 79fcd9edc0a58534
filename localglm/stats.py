"""The one stats snapshot that the CLI, the TUI, the server's /metrics and the benchmarks all read."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # reused from the previous request's KV cache, not recomputed
    restored_prompt_tokens: int = 0  # of those, brought back from a saved prompt (prompt_cache.py) first
    prompt_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    peak_rss_bytes: int = 0
    finish_reason: str = ""
    backend: dict[str, Any] = field(default_factory=dict)  # expert backend counters (offload issue)
    # Speculative decoding with the MTP head (localglm/speculative.py); zeros without it.
    draft_tokens: int = 0  # tokens the MTP head drafted
    accepted_tokens: int = 0  # of those, accepted by the main model
    acceptance_length: float = 0.0  # mean tokens per verification step (accepted drafts + the model's own)
    draft_depths: dict[int, int] = field(default_factory=dict)  # chosen depth -> steps

    @property
    def prompt_tok_s(self) -> float:
        computed = self.prompt_tokens - self.cached_prompt_tokens
        return computed / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first generated token comes out of prefill; decode speed counts the steps after it.
        steps = max(0, self.decode_tokens - 1)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_tok_s"] = round(self.prompt_tok_s, 3)
        d["decode_tok_s"] = round(self.decode_tok_s, 3)
        return d

    def summary_line(self) -> str:
        gib = self.peak_rss_bytes / 2**30
        cached = f" ({self.cached_prompt_tokens} cached)" if self.cached_prompt_tokens else ""
        line = (
            f"prompt: {self.prompt_tokens} tok{cached} @ {self.prompt_tok_s:.1f} tok/s | "
            f"decode: {self.decode_tokens} tok @ {self.decode_tok_s:.1f} tok/s | "
            f"ttft: {self.ttft_s * 1000:.0f} ms | peak RSS: {gib:.2f} GiB"
        )
        b = self.backend
        if self.draft_tokens or self.draft_depths:
            depths = ",".join(f"{k}x{v}" for k, v in sorted(self.draft_depths.items()))
            line += f" | mtp: {self.accepted_tokens}/{self.draft_tokens} drafts accepted, {self.acceptance_length:.2f} tok/step, depths {depths}"
        if "hit_rate" in b:  # offloaded experts: the device cache at work
            line += (
                f" | experts: {100 * b['hit_rate']:.1f}% hits, {b.get('bytes_per_token', 0) / 2**20:.1f} MiB/tok moved"
            )
        return line
