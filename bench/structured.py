#!/usr/bin/env python3
"""The cost of structured output: the same loadgen cells with and without a JSON schema on one
sagellm server (same run, so only the ratio matters), and the schema's compile time.

    python bench/structured.py [--concurrency 1,16] [--max-tokens 64]

The schema asks for a list of at least 40 strings, so every request still writes exactly
--max-tokens tokens (cut by the limit) and both columns do the same amount of work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import ROOT, Running, model_dir, run_cell  # noqa: E402

LONG_LIST = {"type": "object", "properties": {"facts": {
    "type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 40}},
    "required": ["facts"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "role": {"enum": ["admin", "user", "guest"]},
    "address": {"type": "object", "properties": {"street": {"type": "string"},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["street", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4}},
    "required": ["name", "age", "role", "address", "tags"], "additionalProperties": False}


def compile_times() -> list[tuple[str, float, float]]:
    """(schema, first compile ms, cached ms) in this process, as the server compiles them."""
    from transformers import AutoTokenizer

    from sagellm.engine.constraint import GrammarCompiler

    tok = AutoTokenizer.from_pretrained(model_dir())
    t = time.perf_counter()
    compiler = GrammarCompiler(tok, len(tok), (tok.eos_token_id,))
    rows = [("tokenizer setup (once per server)", (time.perf_counter() - t) * 1e3, 0.0)]
    for name, schema in (("nested object", NESTED), ("list of 40+ strings", LONG_LIST)):
        t = time.perf_counter()
        compiler.compile("json_schema", schema, "response_format")
        first = (time.perf_counter() - t) * 1e3
        cached = []
        for _ in range(20):
            t = time.perf_counter()
            compiler.compile("json_schema", schema, "response_format")
            cached.append((time.perf_counter() - t) * 1e3)
        rows.append((name, first, statistics.median(cached)))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--requests", default="1:16,16:64", help="per-concurrency request counts")
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    grid = [int(x) for x in a.concurrency.split(",")]
    counts = dict(tuple(map(int, part.split(":"))) for part in a.requests.split(","))
    out_dir = ROOT / "bench-results" / ("structured-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    out_dir.mkdir(parents=True, exist_ok=True)
    schema_body = {"response_format": {"type": "json_schema", "json_schema": {"name": "facts", "schema": LONG_LIST}}}
    srv = Running("sagellm", model_dir(), out_dir)
    rows = []
    try:
        srv.wait_ready()
        for c in grid:
            n = counts.get(c, 4 * c)
            plain = run_cell(srv, c, n, a.max_tokens)
            schema = run_cell(srv, c, n, a.max_tokens, schema_body)
            rows.append((c, plain, schema))
            print(f"c={c}: {plain['out_tok_per_s']:.1f} tok/s plain, {schema['out_tok_per_s']:.1f} with the schema",
                  file=sys.stderr, flush=True)
    finally:
        srv.stop()
    print("\n| c | tok/s plain | tok/s JSON schema | ratio | ITL p50 plain / schema ms | errors |")
    print("|---|---|---|---|---|---|")
    for c, p, s in rows:
        print(f"| {c} | {p['out_tok_per_s']:.1f} | {s['out_tok_per_s']:.1f} | "
              f"{s['out_tok_per_s'] / p['out_tok_per_s']:.2f}x | {p['itl_ms_p50']} / {s['itl_ms_p50']} | "
              f"{p['errors']} / {s['errors']} |")
    print("\n| schema | first compile ms | cached ms |")
    print("|---|---|---|")
    for name, first, cached in compile_times():
        print(f"| {name} | {first:.1f} | {cached:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
