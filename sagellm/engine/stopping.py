"""When a sequence ends, decided after each of its tokens, first rule first: an EOS token (once
min_tokens allow it and unless ignore_eos; a grammar may always end), a grammar that allows
nothing more, a stop string, a stop token, then the length limits and the request's deadline."""

from __future__ import annotations

import time

from sagellm.engine.events import FinishReason
from sagellm.engine.sequence import Sequence


def finish_reason(seq: Sequence, token_id: int, stop_string: str | None, eos_token_ids: tuple[int, ...],
                  max_total_tokens: int) -> tuple[FinishReason | None, str | int | None]:
    """(why `seq` ends with `token_id`, the stop string or token id that ended it), or (None, None).
    stop_string: the stop string the decoded text now contains, if any."""
    p = seq.params
    n = len(seq.output_ids)
    if token_id in eos_token_ids and (seq.matcher is not None or (not p.ignore_eos and n >= p.min_new_tokens)):
        return FinishReason.EOS_TOKEN, None
    if seq.matcher is not None and seq.matcher.finished:  # ends like an EOS
        return FinishReason.EOS_TOKEN, None
    if stop_string is not None:
        return FinishReason.STOP_SEQUENCE, stop_string
    if token_id in p.stop_token_ids:
        return FinishReason.STOP_SEQUENCE, token_id
    if n >= p.max_new_tokens or seq.num_tokens >= max_total_tokens or (
            p.deadline is not None and time.monotonic() >= p.deadline):
        return FinishReason.LENGTH, None
    return None, None
