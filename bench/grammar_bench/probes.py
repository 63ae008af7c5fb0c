"""Measuring helpers for the worker: a library-independent mask reference, heap and RSS
readings, percentiles and a microsecond clock."""

from __future__ import annotations

import ctypes
import time


def torch_apply(logits, bitmask) -> None:
    """Library-independent reference: unpack the int32 bitmask and mask logits to -inf."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)
    logits.masked_fill_(
        ~allowed[..., : logits.shape[-1]].view(logits.shape), float("-inf")
    )


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap_bytes() -> int:
    """Bytes currently handed out by glibc malloc (where native libraries allocate).

    RSS is too coarse for per-matcher sizes because freed pages get reused."""
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def now_us() -> float:
    return time.perf_counter_ns() / 1000
