#!/usr/bin/env python3
"""sagellm's two incremental detokenizers, in-process: tokenizers' own DecodeStream (what fast
tokenizers get) and the window decode (two tokenizer.decode calls a token, for tokenizers without
a Rust backend). Microseconds per token over the same token streams (English, code, and text
with multi-byte characters), and whether both give the same text piece by piece.

    python bench/detokenize.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer  # noqa: E402

from sagellm.engine.detokenizer import StreamDetokenizer, WindowDetokenizer  # noqa: E402
from sagellm.model.bundled import bundled_model_dir  # noqa: E402

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. " * 40,
    "code": "def f(x):\n    return {'a': [x, x ** 2]}  # squares\n" * 30,
    "multibyte": "Grüße aus Köln — 東京タワー 🚀✨ naïve café, ½ ≠ ∞. " * 30,
}


def window(tokenizer, prompt):
    return WindowDetokenizer(tokenizer, prompt[-5:])


def stream(tokenizer, prompt):
    return StreamDetokenizer(tokenizer.backend_tokenizer, prompt[-5:])


def run(make, tokenizer, prompt, ids) -> tuple[float, list[str]]:
    d = make(tokenizer, prompt)
    t0 = time.perf_counter()
    pieces = [d.step(t) for t in ids]
    return time.perf_counter() - t0, pieces


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(bundled_model_dir())
    prompt = tok("Write something:").input_ids
    print("| text | tokens | window decode us/token | DecodeStream us/token | same pieces |")
    print("|---|---|---|---|---|")
    for name, text in TEXTS.items():
        ids = tok(text, add_special_tokens=False).input_ids
        slow = min(run(window, tok, prompt, ids)[0] for _ in range(a.repeat))
        fast = min(run(stream, tok, prompt, ids)[0] for _ in range(a.repeat))
        same = run(window, tok, prompt, ids)[1] == run(stream, tok, prompt, ids)[1]
        print(f"| {name} | {len(ids)} | {1e6 * slow / len(ids):.1f} | {1e6 * fast / len(ids):.1f} | {same} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
