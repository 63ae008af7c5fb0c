"""The Responses API's store: bounded by count (oldest dropped first) and age, safe to use from
many threads at once."""

from __future__ import annotations

import threading
import time

from sagellm.api.protocol_responses import ResponseObject
from sagellm.api.response_store import ResponseStore


def response(rid: str) -> ResponseObject:
    return ResponseObject(id=rid, created_at=0, status="completed", instructions=None, max_output_tokens=None,
                          model="m", parallel_tool_calls=True, previous_response_id=None, store=True,
                          temperature=None, top_p=None, top_logprobs=None, tool_choice="auto", tools=[],
                          text={"format": {"type": "text"}}, metadata={}, user=None)


def test_oldest_dropped_beyond_the_size():
    store = ResponseStore(max_items=3, ttl_s=60)
    for i in range(5):
        store.put(response(f"r{i}"), [{"role": "user", "content": str(i)}])
    assert len(store) == 3 and store.get("r0") is None and store.get("r1") is None
    assert store.get("r4").messages == [{"role": "user", "content": "4"}]
    assert store.delete("r3") and not store.delete("r3") and store.get("r3") is None


def test_expired_after_the_ttl():
    store = ResponseStore(max_items=10, ttl_s=0.05)
    store.put(response("old"), [])
    time.sleep(0.1)
    store.put(response("new"), [])
    assert store.get("old") is None and store.get("new") is not None and len(store) == 1


def test_many_threads_keep_the_bound():
    store = ResponseStore(max_items=50, ttl_s=60)

    def work(t: int):
        for i in range(200):
            store.put(response(f"{t}-{i}"), [])
            store.get(f"{t}-{i - 1}")
            if i % 3 == 0:
                store.delete(f"{t}-{i - 2}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store) <= 50
