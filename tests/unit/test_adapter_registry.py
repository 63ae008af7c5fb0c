"""The adapter registry's resident set (sagellm.engine.adapters): the snapshot each LoRA step reads
without the registry's lock is one tuple, replaced exactly when an adapter is loaded, unloaded,
swapped in or swapped out."""

from __future__ import annotations

from sagellm.engine.adapters import AdapterRegistry
from sagellm.model.lora import LoraWeights


def uids(snapshot) -> list[int]:
    return [w.uid for w in snapshot]


def test_the_resident_snapshot_changes_only_with_the_resident_set():
    reg = AdapterRegistry(lambda name, folder: LoraWeights(name, folder, 4, {}), max_loras=2)
    assert reg.resident_weights() == ()
    a = reg.add("a", "/a")
    first = reg.resident_weights()
    assert uids(first) == [a.uid] and reg.resident_weights() is first
    b = reg.add("b", "/b")
    both = reg.resident_weights()
    assert both is not first and uids(both) == sorted([a.uid, b.uid])
    reg.release(reg.acquire("a"))  # already resident: only its LRU place moves
    assert reg.resident_weights() is both
    reg.add("c", "/c")  # no free slot: b, the least recently used idle one, is swapped out
    swapped = reg.resident_weights()
    assert swapped is not both and [w.name for w in swapped] == ["a", "c"]
    b_again = reg.acquire("b")  # read back in (a new load, a new uid), a swapped out
    back = reg.resident_weights()
    assert back is not swapped and [w.name for w in back] == ["c", "b"] and b_again.uid not in (a.uid, b.uid)
    reg.release(b_again)
    reg.remove("a")  # registered but not resident: the set stays
    assert reg.resident_weights() is back
    reg.remove("c")
    assert [w.name for w in reg.resident_weights()] == ["b"]
