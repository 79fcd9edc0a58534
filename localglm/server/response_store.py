"""The Responses API's stored responses, kept in memory for `previous_response_id` and GET /v1/responses/{id}.

OpenAI stores a response unless the request says `store: false`; agents that chain turns with
`previous_response_id` rely on it. Here the last `capacity` responses live in RAM (gone when the
server stops): each holds the conversation it ended (without `instructions`, which OpenAI does not
carry over to the next turn) and the response object as it was sent.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_CAPACITY = 64  # an agent's long conversation is ~0.5 MB of messages: bounded to tens of MB


@dataclass(frozen=True)
class StoredResponse:
    history: list[dict[str, Any]]  # chat messages up to and including this response's own
    body: dict[str, Any]  # the response object


class ResponseStore:
    """The most recently stored responses, oldest dropped first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, ident: str) -> StoredResponse | None:
        found = self._items.get(ident)
        if found is not None:
            self._items.move_to_end(ident)
        return found

    def put(self, ident: str, stored: StoredResponse) -> None:
        self._items[ident] = stored
        self._items.move_to_end(ident)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def delete(self, ident: str) -> bool:
        return self._items.pop(ident, None) is not None
