"""Server settings and the objects every route shares (model, engine worker, metrics, test hook)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import LogitsProcessor, Model
from ..prompt_cache import PromptCache, prompt_cache_for
from ..sampling import SamplingParams
from .metrics import Metrics
from .response_store import ResponseStore
from .worker import EngineWorker

# (endpoint, request JSON) -> logits processor for that request, or None. A constructor argument of
# the app only, never reachable over HTTP: tests use it to force the model's exact output.
LogitsProcessorHook = Callable[[str, dict[str, Any]], LogitsProcessor | None]


MIN_BODY_BYTES = 4 * 2**20
BODY_BYTES_PER_TOKEN = 16  # JSON of a long conversation: ~4 characters per token, escapes and structure


@dataclass
class ServerSettings:
    model_name: str = "localglm"
    api_key: str | None = None
    queue_size: int = 16  # requests that may wait while one generates; more are answered 503
    enable_thinking: bool | None = None  # None: the chat template's default (thinking on); False: --no-think
    clear_thinking: bool | None = None  # None: the template's default (GLM-4.7 / 5.x drop earlier turns' reasoning); False: --keep-thinking
    reuse_prefix: bool = True
    # Prompts set aside in RAM for conversations that take turns (prompt_cache.py): bytes, 0 off, None automatic.
    cache_ram_bytes: int | None = None
    # Saved prompts on disk under this directory (prompt_disk.py; --cache-dir), within cache_disk_bytes (None: the default).
    cache_dir: Path | None = None
    cache_disk_bytes: int | None = None
    sampling: SamplingParams | None = None  # defaults for requests (None: the checkpoint's generation_config)
    heartbeat_s: float = 10.0  # keep-alive on quiet streams (queued or prefilling)
    # What a request may cost before it reaches the queue (a body is JSON parsed in memory, then tokenized).
    max_body_bytes: int | None = None  # None: `body_limit(ctx)`
    body_timeout_s: float = 30.0  # the whole body must arrive within this (408 and the connection closed)
    # Connection limits, applied by `localglm.server.http` (uvicorn has no header deadline).
    header_timeout_s: float = 10.0  # a request head must arrive within this after connecting or the last reply
    keep_alive_s: int = 5  # idle time before a kept-alive connection is closed (uvicorn's timeout_keep_alive)
    max_idle_connections: int = 32  # connections waiting for a request head; the longest waiting is closed first
    max_connections: int = 128  # beyond this, requests are answered 503 (uvicorn's limit_concurrency)
    # DNS-rebinding protection: besides localhost names and IP literals, the Host header may only name these
    # ("*": any). `localglm serve --host NAME` adds NAME.
    allowed_hosts: tuple[str, ...] = ()
    parse_special_tokens: bool = False  # True: special-token text in message content becomes special tokens
    tool_grammar: bool = True  # hold tool calls to GLM's format while decoding (localglm/grammar); --no-tool-grammar

    def prompt_cache(self, setup: str | None = None) -> PromptCache | None:
        """The store for conversations set aside (`cache_ram_bytes`, and `cache_dir` for the model `setup`);
        none without prefix reuse."""
        if not self.reuse_prefix:
            return None
        return prompt_cache_for(self.cache_ram_bytes, disk_dir=self.cache_dir, disk_budget=self.cache_disk_bytes, setup=setup)

    def body_limit(self, ctx: int) -> int:
        """The request body cap: `max_body_bytes`, or by default 4 MiB or 16 bytes per context token if more."""
        return self.max_body_bytes if self.max_body_bytes is not None else max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * ctx)


@dataclass
class ServerState:
    model: Model
    settings: ServerSettings
    worker: EngineWorker
    metrics: Metrics
    hook: LogitsProcessorHook | None = None
    started_at: float = field(default_factory=time.time)
    # One prompt is tokenized at a time: tokenizing takes a few hundred bytes per token, so parallel
    # big prompts multiply the peak memory, and they would share the same cores anyway.
    tokenize_lock: threading.Lock = field(default_factory=threading.Lock)
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses

    def begin_shutdown(self) -> None:
        """Called when the server starts shutting down: every queued or running job ends with an error
        its client sees (a final SSE error event, or a 503), before the connections are closed."""
        self.worker.shutdown()

    @property
    def sampling(self) -> SamplingParams:
        return self.settings.sampling or self.model.default_sampling
