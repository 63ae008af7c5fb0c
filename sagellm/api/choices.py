"""What the OpenAI routes (chat and completions) share about choices: the words for how a
choice finished, and several choices' streams merged into one."""

from __future__ import annotations

import queue
import threading

from sagellm import __version__
from sagellm.engine.events import FinishReason

FINGERPRINT = f"sagellm-{__version__}"


def finish_reason(reason: FinishReason) -> str:
    """OpenAI's word: "length", else "stop" (end of text, a stop string or token)."""
    return "length" if reason == FinishReason.LENGTH else "stop"


def interleave(sources, on_error):
    """(index, item) from several iterators, in the order the items come. Each runs, and is
    closed, in its own thread; an exception becomes the item `on_error(exc)`."""
    if len(sources) == 1:
        try:
            for item in sources[0]:
                yield 0, item
        except Exception as exc:
            yield 0, on_error(exc)
        finally:
            if hasattr(sources[0], "close"):
                sources[0].close()
        return
    q: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def pump(i, source):
        try:
            for item in source:
                if stop.is_set():
                    break
                q.put((i, item))
        except Exception as exc:  # engine died: surface it in the stream
            q.put((i, on_error(exc)))
        finally:
            if hasattr(source, "close"):
                source.close()
            q.put((i, StopIteration))

    for i, source in enumerate(sources):
        threading.Thread(target=pump, args=(i, source), daemon=True).start()
    open_ = len(sources)
    try:
        while open_:
            i, item = q.get()
            if item is StopIteration:
                open_ -= 1
                continue
            yield i, item
    finally:
        stop.set()


