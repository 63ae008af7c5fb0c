"""The LoRA adapters the engine serves: which are registered (name -> folder), which are resident
(read into memory, at most MAX_LORAS, least recently used swapped out), and how many requests run
on each, so removing one lets those finish first and eviction only takes idle ones.

Registering reads and checks the adapter against the base model (sagellm.model.lora.read_adapter),
so a bad one is refused when it is added, not when a request first names it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from sagellm.errors import ModelLoadError, NotFound, Overloaded, Unavailable, ValidationError
from sagellm.model.lora import AdapterError, LoraWeights, locate

log = logging.getLogger("sagellm")

# How long a request waits for an adapter slot when all MAX_LORAS resident adapters are busy,
# and how long removing an adapter waits for its requests, before giving up with an error.
WAIT_S = 300.0
DEFAULT_MAX_LORAS = 8  # adapters resident at once when MAX_LORAS is unset


class AdapterRegistry:
    def __init__(self, read: Callable[[str, str], LoraWeights], max_loras: int, reserved: tuple[str, ...] = ()):
        """read(name, folder) -> LoraWeights, raising AdapterError; reserved: names that select the
        base model (its served name and id), which no adapter may take."""
        self._read = read
        self.max_loras = max_loras
        self._reserved = reserved
        self._folders: dict[str, str] = {}
        self._resident: OrderedDict[str, LoraWeights] = OrderedDict()  # least recently used first
        # The resident adapters by uid, replaced (never changed) whenever that set changes: each
        # LoRA step reads it without the lock, and a new tuple tells the model to restack.
        self._resident_weights: tuple[LoraWeights, ...] = ()
        self._running: dict[str, int] = {}
        self._removing: set[str] = set()
        self._cond = threading.Condition()

    def names(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(n for n in self._folders if n not in self._removing)

    def resident(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(self._resident)

    def resident_weights(self) -> tuple[LoraWeights, ...]:
        """The resident adapters, sorted by uid: the same tuple until one is loaded or dropped."""
        return self._resident_weights

    def running(self) -> dict[str, int]:
        with self._cond:
            return {n: c for n, c in self._running.items() if c}

    def add(self, name: str, folder: str) -> LoraWeights:
        """Read, check and register an adapter (resident if a slot is free or idle); raises
        AdapterError for a bad one, ValidationError for a name already taken."""
        if not name or name != name.strip() or name in self._reserved:
            raise ValidationError(f"`{name}` cannot name an adapter (empty, spaces around it, or the base model's "
                                  "name)", param="name")
        with self._cond:
            if name in self._folders:
                raise ValidationError(f"adapter `{name}` is already loaded; unload it first", param="name")
        weights = self._read(name, folder)  # outside the lock: requests on other adapters go on
        with self._cond:
            if name in self._folders:
                raise ValidationError(f"adapter `{name}` is already loaded; unload it first", param="name")
            self._folders[name] = folder
            if self._make_room():
                self._resident[name] = weights
                self._resident_changed()
        log.info("LoRA adapter %s registered from %s (rank %d, %s)", name, folder, weights.rank,
                 ", ".join(weights.targets))
        return weights

    def remove(self, name: str) -> None:
        """Unregister `name`: new requests naming it get 404 at once, running ones finish first."""
        with self._cond:
            if name not in self._folders or name in self._removing:
                raise NotFound(f"adapter `{name}` is not loaded", param="name")
            self._removing.add(name)
            if not self._cond.wait_for(lambda: not self._running.get(name), WAIT_S):
                self._removing.discard(name)
                raise Unavailable(f"adapter `{name}` still has requests running after {WAIT_S:.0f}s; not removed")
            self._removing.discard(name)
            del self._folders[name]
            if self._resident.pop(name, None) is not None:
                self._resident_changed()
            self._running.pop(name, None)
            self._cond.notify_all()
        log.info("LoRA adapter %s unregistered", name)

    def acquire(self, name: str) -> LoraWeights:
        """The adapter's weights for one more request (reading them back in if it was swapped out);
        release() them when the request ends."""
        with self._cond:
            if name not in self._folders or name in self._removing:
                raise NotFound(f"adapter `{name}` is not loaded", param="adapter_id")
            weights = self._resident.get(name)
            if weights is None:
                if not self._cond.wait_for(self._make_room, WAIT_S):
                    raise Overloaded(f"all MAX_LORAS={self.max_loras} resident adapters are busy; adapter "
                                     f"`{name}` cannot be swapped in")
                try:
                    weights = self._read(name, self._folders[name])
                except AdapterError as exc:
                    raise Unavailable(f"adapter `{name}` could not be read back in: {exc.message}") from None
                self._resident[name] = weights
                self._resident_changed()
                log.info("LoRA adapter %s swapped in", name)
            self._resident.move_to_end(name)
            self._running[name] = self._running.get(name, 0) + 1
            return weights

    def release(self, weights: LoraWeights) -> None:
        with self._cond:
            self._running[weights.name] = self._running.get(weights.name, 1) - 1
            self._cond.notify_all()

    def _make_room(self) -> bool:
        """A free resident slot, swapping out the least recently used idle adapter if need be
        (lock held); False when every resident adapter has requests running."""
        if len(self._resident) < self.max_loras:
            return True
        idle = next((n for n in self._resident if not self._running.get(n)), None)
        if idle is None:
            return False
        del self._resident[idle]
        self._resident_changed()
        log.info("LoRA adapter %s swapped out (MAX_LORAS=%d)", idle, self.max_loras)
        return True

    def _resident_changed(self) -> None:
        """(lock held) A new snapshot of the resident set."""
        self._resident_weights = tuple(sorted(self._resident.values(), key=lambda w: w.uid))


def configured_registry(read: Callable[[str, str], LoraWeights], max_loras: int | None, reserved: tuple[str, ...],
                        adapters: list[tuple[str, str]], model_dir: str, hf_token: str | None) -> AdapterRegistry:
    """The registry with every configured adapter (LORA_ADAPTERS and <model_dir>/adapters/) read and
    checked, for either engine: a bad or doubly configured one stops start-up with one line naming it;
    the first max_loras stay resident."""
    registry = AdapterRegistry(read, max_loras or DEFAULT_MAX_LORAS, reserved=reserved)
    seen = set()
    for name, src in adapters:
        if name in seen:
            raise ModelLoadError(f"LoRA adapter `{name}` is configured twice (LORA_ADAPTERS and {model_dir}/adapters/)")
        seen.add(name)
        try:
            registry.add(name, locate(name, src, hf_token))
        except ValidationError as exc:
            raise ModelLoadError(f"LoRA adapter `{name}`: {exc.message}") from None
    return registry
