"""The engine configuration vLLM logs at start-up ("... with config: model='...', seed=0, ..."),
read back into {field: value} so bench/run.py can print where two servers' engines differ."""

from __future__ import annotations

from pathlib import Path

CONFIG_LINE = "with config: "
_OPEN, _CLOSE = "([{", ")]}"


def top_level_fields(text: str) -> list[str]:
    """`text` cut at the commas outside brackets and quotes: a value such as
    StructuredOutputsConfig(backend='guidance', disable_any_whitespace=False) or {'mode': 2, ...}
    stays whole."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "'\"" and (i == 0 or text[i - 1] in "=([{ :,"):  # opens a quoted value, not it's
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_config(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in top_level_fields(text) if "=" in part)


def vllm_config(log: Path) -> dict[str, str]:
    """The engine configuration vLLM logged at start-up, {field: value} (empty: not vLLM)."""
    for line in log.read_text(errors="replace").splitlines():
        if CONFIG_LINE in line:
            return parse_config(line.split(CONFIG_LINE, 1)[1])
    return {}
