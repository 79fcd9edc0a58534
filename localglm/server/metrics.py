"""`GET /metrics`: Prometheus text format built from the engine's `GenerationStats` snapshots.

The exposition format is a few lines of text, so it is written here rather than pulled in with
prometheus_client (whose global registry would also collide between servers in one test process).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..engine import Done
from ..prompt_cache import PromptCache
from .worker import EngineWorker, Job


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


# /metrics lines of the saved prompts: (name after localglm_prompt_cache_, kind, help, tier, value of the
# tier's store: the PromptCache in RAM, or its PromptDisk with --cache-dir).
PROMPT_CACHE_METRICS: tuple[tuple[str, str, str, str, Callable[[Any], int]], ...] = (
    ("bytes", "gauge", "RAM held by prompts set aside (--cache-ram).", "ram", lambda s: s.nbytes),
    ("budget_bytes", "gauge", "The most RAM prompts set aside may hold.", "ram", lambda s: s.budget),
    ("entries", "gauge", "Prompts set aside.", "ram", lambda s: len(s.entries)),
    ("restores_total", "counter", "Prompts that started from one set aside.", "ram", lambda s: s.restores),
    ("restored_tokens_total", "counter", "Prompt tokens restored instead of prefilled.", "ram", lambda s: s.restored_tokens),
    ("refused_total", "counter", "Caches larger than --cache-ram, not kept.", "ram", lambda s: s.refused),
    ("disk_bytes", "gauge", "Disk held by saved prompts (--cache-dir).", "disk", lambda s: s.nbytes),
    ("disk_budget_bytes", "gauge", "The most disk saved prompts may hold (--cache-disk).", "disk", lambda s: s.budget),
    ("disk_entries", "gauge", "Saved prompts on disk.", "disk", lambda s: len(s.entries)),
    ("disk_loads_total", "counter", "Saved prompts read back from disk.", "disk", lambda s: s.loads),
    ("disk_writes_total", "counter", "Saved prompts written to disk.", "disk", lambda s: s.writes),
    ("disk_failed_total", "counter", "Saved prompt files that could not be written or read.", "disk", lambda s: s.failed),
)


class Metrics:
    """Counters and the last request's stats; thread-safe (the engine thread writes, the loop reads)."""

    def __init__(self, model_name: str, ctx: int, prompt_cache: PromptCache | None = None) -> None:
        self.model_name = model_name
        self.ctx = ctx
        self.prompt_cache = prompt_cache  # the model's saved prompts (serve --cache-ram), reported as they change
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.finish_reasons: Counter[str] = Counter()
        self.rejected = 0
        self.cancelled = 0
        self.failed = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0
        self.draft_tokens = 0  # speculative decoding with the MTP head
        self.accepted_tokens = 0
        self.draft_depths: Counter[int] = Counter()
        self.ttft_sum = 0.0
        self.queue_wait_sum = 0.0
        self.generations = 0
        self.last: dict[str, Any] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def on_finish(self, job: Job, done: Done | None) -> None:
        """Called by the engine thread when a job ends (done is None when it failed or never ran)."""
        with self._lock:
            if done is None:
                if job.cancel.is_set():
                    self.cancelled += 1
                else:
                    self.failed += 1
                return
            s = done.stats
            self.generations += 1
            self.finish_reasons[done.finish_reason] += 1
            if done.finish_reason == "cancelled":
                self.cancelled += 1
            self.prompt_tokens += s.prompt_tokens
            self.cached_prompt_tokens += s.cached_prompt_tokens
            self.generated_tokens += s.decode_tokens
            self.draft_tokens += s.draft_tokens
            self.accepted_tokens += s.accepted_tokens
            self.draft_depths.update(s.draft_depths)
            self.ttft_sum += s.ttft_s
            if job.started_at is not None:
                self.queue_wait_sum += job.started_at - job.enqueued_at
            self.last = s.to_dict()

    def render(self, worker: EngineWorker) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP localglm_{name} {help_}")
            lines.append(f"# TYPE localglm_{name} {kind}")
            for labels, value in samples:
                tag = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                lines.append(f"localglm_{name}{{{tag}}} {_num(value)}" if tag else f"localglm_{name} {_num(value)}")

        with self._lock:
            metric("info", "gauge", "The served model.", [({"model": self.model_name}, 1)])
            metric("context_tokens", "gauge", "KV-cache size in tokens.", [({}, self.ctx)])
            metric(
                "requests_total", "counter", "HTTP requests by endpoint and status.",
                [({"endpoint": e, "status": str(c)}, n) for (e, c), n in sorted(self.requests.items())],
            )
            metric("queue_waiting", "gauge", "Requests waiting for the engine.", [({}, worker.waiting)])
            metric("queue_capacity", "gauge", "Most requests that may wait (--queue-size).", [({}, worker.max_waiting)])
            metric("engine_busy", "gauge", "1 while a generation runs.", [({}, int(worker.busy))])
            metric("requests_rejected_total", "counter", "Requests answered 503 because the queue was full.", [({}, self.rejected)])
            metric("generations_cancelled_total", "counter", "Generations stopped because the client went away.", [({}, self.cancelled)])
            metric("generations_failed_total", "counter", "Generations that ended in an error.", [({}, self.failed)])
            metric(
                "generations_total", "counter", "Finished generations by engine finish reason.",
                [({"finish_reason": r}, n) for r, n in sorted(self.finish_reasons.items())],
            )
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished generations.", [({}, self.prompt_tokens)])
            metric(
                "prompt_tokens_cached_total", "counter",
                "Prompt tokens reused from the KV cache (prefix reuse) instead of recomputed.", [({}, self.cached_prompt_tokens)],
            )
            metric("generated_tokens_total", "counter", "Generated tokens.", [({}, self.generated_tokens)])
            store = self.prompt_cache
            if store is not None:  # conversations set aside (serve --cache-ram, --cache-dir)
                for name, kind, help_, tier, value in PROMPT_CACHE_METRICS:
                    source = store if tier == "ram" else store.disk
                    if source is not None:
                        metric(f"prompt_cache_{name}", kind, help_, [({}, value(source))])
            if self.draft_depths:
                metric("draft_tokens_total", "counter", "Tokens the MTP head drafted (speculative decoding).", [({}, self.draft_tokens)])
                metric("accepted_tokens_total", "counter", "Drafted tokens the model accepted.", [({}, self.accepted_tokens)])
                steps = sum(self.draft_depths.values())
                metric(
                    "acceptance_length", "gauge", "Mean tokens per verification step (accepted drafts + the model's own), all generations.",
                    [({}, (self.accepted_tokens + steps) / steps)],
                )
                metric(
                    "draft_steps_total", "counter", "Verification steps by the draft depth chosen.",
                    [({"depth": str(d)}, n) for d, n in sorted(self.draft_depths.items())],
                )
            metric("time_to_first_token_seconds_sum", "counter", "Sum of time to first token.", [({}, self.ttft_sum)])
            metric("queue_wait_seconds_sum", "counter", "Sum of time requests waited in the queue.", [({}, self.queue_wait_sum)])
            last = self.last
            if last:
                metric("last_prompt_tokens_per_second", "gauge", "Prefill speed of the last generation.", [({}, last["prompt_tok_s"])])
                metric("last_decode_tokens_per_second", "gauge", "Decode speed of the last generation.", [({}, last["decode_tok_s"])])
                metric("last_time_to_first_token_seconds", "gauge", "Time to first token of the last generation.", [({}, last["ttft_s"])])
                metric("last_prompt_tokens", "gauge", "Prompt tokens of the last generation.", [({}, last["prompt_tokens"])])
                metric("last_cached_prompt_tokens", "gauge", "Prompt tokens of the last generation taken from the cache.", [({}, last["cached_prompt_tokens"])])
                metric("peak_rss_bytes", "gauge", "Peak resident memory of the server process.", [({}, last["peak_rss_bytes"])])
                backend = {k: v for k, v in (last.get("backend") or {}).items() if isinstance(v, (int, float))}
                for key, value in sorted(backend.items()):
                    name = "backend_" + "".join(c if c.isalnum() else "_" for c in str(key))
                    metric(name, "gauge", f"Expert backend counter {key} (last generation).", [({}, value)])
        return "\n".join(lines) + "\n"
