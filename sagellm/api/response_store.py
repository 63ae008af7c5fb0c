"""The Responses API's memory: responses created with `store` (the default), each with the
conversation it answered, so `previous_response_id` can continue it and GET / DELETE
/v1/responses/{id} can read or forget it. In this process only, bounded by count
(RESPONSES_STORE_SIZE, oldest dropped first) and age (RESPONSES_STORE_TTL_S); a lock guards it,
since gunicorn serves requests from several threads of one worker."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sagellm.api.protocol_responses import ResponseObject


@dataclass(frozen=True)
class Stored:
    response: ResponseObject
    messages: list[dict]  # the conversation it answered, in chat form, without its instructions
    at: float  # time.monotonic() when stored


class ResponseStore:
    def __init__(self, max_items: int = 1000, ttl_s: float = 3600.0):
        self.max_items, self.ttl_s = max_items, ttl_s
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response: ResponseObject, messages: list[dict]) -> None:
        now = time.monotonic()
        with self._lock:
            self._items[response.id] = Stored(response, messages, now)
            self._items.move_to_end(response.id)
            self._expire(now)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            self._expire(time.monotonic())
            return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            self._expire(time.monotonic())
            return self._items.pop(response_id, None) is not None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire(self, now: float) -> None:
        # Insertion order is age order: drop from the oldest end while too old.
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.at <= self.ttl_s:
                break
            self._items.popitem(last=False)
