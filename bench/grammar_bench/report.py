"""The Markdown report of bench/grammar_compare.py."""

from __future__ import annotations

from typing import Any

from grammar_bench.backends import BACKENDS
from grammar_bench.fixtures import BATCH, FEATURES, GRAMMARS, INVALID_SCHEMAS, MATCHERS_FOR_MEMORY, WALK_REPS


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def result_table(get, libs: list[str], task: str, columns: list[tuple[str, str]]) -> None:
    """One row per library: its failure, or the named fields of its `task` result."""
    rows = []
    for lib in libs:
        r = get(lib, task)
        bad = failure(r)
        rows.append([lib, bad] + [None] * (len(columns) - 1) if bad else [lib] + [r[key] for _, key in columns])
    print(table(["library"] + [header for header, _ in columns], rows))


def failure(result: dict) -> str | None:
    for key in ("exception", "timeout", "crash", "error"):
        if key in result:
            return f"{key.upper()}: {result[key]}"
    return None


def report(all_results: dict[str, dict[str, dict]], libs: list[str]) -> None:
    def get(lib: str, task: str) -> dict:
        return all_results[lib].get(task, {"exception": "not run"})

    print(
        "\n## 1. Tokenizer setup (build the library's tokenizer info from the HF tokenizer)\n"
    )
    rows = []
    for lib in libs:
        r = get(lib, "setup")
        rows.append(
            [
                lib,
                failure(r) or r["import_ms"],
                r.get("cold_ms"),
                r.get("repeat_ms"),
                r.get("rss_delta_mb"),
            ]
        )
    print(
        table(
            [
                "library",
                "import ms",
                "tokenizer setup ms (cold)",
                "setup ms (repeat)",
                "RSS delta MiB",
            ],
            rows,
        )
    )

    print("\n## 2. Grammar compile\n")
    print(
        "repeat = same grammar again (cache hit where the library caches); no-cache = after "
        "clear_cache(); first mask = fill on a fresh matcher right after compile.\n"
    )
    rows = []
    for name in GRAMMARS:
        for lib in libs:
            r = get(lib, f"compile:{name}")
            bad = failure(r)
            if bad:
                rows.append([name, lib, bad, None, None, None, None, None])
                continue
            size = r.get("size_bytes")
            rows.append(
                [
                    name,
                    lib,
                    r["first_ms"],
                    r["repeat_ms"],
                    r.get("nocache_ms"),
                    r["first_mask_us"],
                    r["sample_ok"],
                    f"{size / 1024:.0f}" if size else None,
                ]
            )
    print(
        table(
            [
                "grammar",
                "library",
                "first ms",
                "repeat ms",
                "no-cache ms",
                "first mask µs",
                "valid sample accepted",
                "compiled KiB",
            ],
            rows,
        )
    )

    print(
        f"\n## 3. Per-token cost, schema (a), batch 1 (warm: {WALK_REPS} walks; logits float32 [vocab])\n"
    )
    result_table(get, libs, "walk", [
        ("tokens", "tokens"), ("mask mean µs", "mask_mean_us"), ("mask p50 µs", "mask_p50_us"),
        ("mask p99 µs", "mask_p99_us"), ("apply mean µs", "apply_mean_us"), ("apply p50 µs", "apply_p50_us"),
        ("apply p99 µs", "apply_p99_us"), ("plain-torch apply µs", "ref_apply_mean_us"),
        ("apply == plain torch", "same_as_ref"), ("cold walk ms", "first_walk_ms"),
        ("apply 1st-call ms", "apply_warmup_ms"), ("every token allowed", "all_allowed"),
        ("accepting at end", "accepting"), ("EOS allowed at end", "eos_allowed")])
    print(
        "\napply functions: "
        + "; ".join(f"{lib}: {BACKENDS[lib].apply_fn}" for lib in libs)
    )

    print(
        f"\n## 3b. Batch {BATCH}: {BATCH} independent matchers, one [{BATCH}, words] bitmask, per decode step\n"
    )
    result_table(get, libs, "batch", [
        ("steps", "steps"), ("batch fill mean µs/step", "fill_mean_us"), ("batch fill p99 µs/step", "fill_p99_us"),
        ("one-by-one fill mean µs/step", "loop_mean_us"), (f"apply [{BATCH},V] µs", "apply_mean_us"),
        ("consume µs/step", "consume_mean_us"), ("all valid, masks equal", "all_ok")])
    print(
        "\nbatch fill: llguidance fill_next_token_bitmask_par(LLExecutor()); xgrammar "
        "BatchGrammarMatcher().batch_fill_next_token_bitmask (both with their default thread counts); "
        "outlines-core has no batch call (loop of Guide.write_mask_into)."
    )

    print("\n## 4. JSON-schema feature coverage\n")
    print(
        "OK = compiles, valid instance accepted, violating instance rejected; "
        "'ignored' = compiles but the keyword is not enforced.\n"
    )
    rows, messages = [], []
    for name in FEATURES:
        row: list[Any] = [name]
        for lib in libs:
            r = get(lib, f"feature:{name}")
            bad = failure(r)
            if bad:
                row.append(bad.split(":")[0])
                messages.append([name, lib, bad])
            else:
                row.append(r["verdict"])
                if "message" in r:
                    messages.append([name, lib, r["message"]])
        rows.append(row)
    print(table(["feature"] + libs, rows))
    if messages:
        print("\nError messages (first line):\n")
        print(table(["feature", "library", "message"], messages))

    print("\n## 4b. Invalid schemas\n")
    rows = []
    for name in INVALID_SCHEMAS:
        for lib in libs:
            r = get(lib, f"invalid:{name}")
            bad = failure(r)
            rows.append(
                [
                    name,
                    lib,
                    bad.split(":")[0] if bad else r["verdict"],
                    bad or r.get("message"),
                ]
            )
    print(table(["schema", "library", "behaviour", "message (first line)"], rows))

    print("\n## 5. Memory (separate fresh process per library)\n")
    print(
        "heap = bytes allocated through malloc, measured with glibc mallinfo2(); RSS in MiB.\n"
    )
    rows = []
    for lib in libs:
        m = get(lib, "memory")
        bad = failure(m)
        if bad:
            rows.append([lib, bad, None, None, None, None, None])
            continue
        rows.append(
            [
                lib,
                m["setup_heap_mb"],
                m["setup_rss_mb"],
                m["compile_all_heap_mb"],
                m["compile_all_rss_mb"],
                m["per_matcher_kb"],
                m["peak_mb"],
            ]
        )
    print(
        table(
            [
                "library",
                "tokenizer info heap MiB",
                "tokenizer info RSS MiB",
                f"all {len(GRAMMARS)} grammars heap MiB",
                "all grammars RSS MiB",
                f"per matcher KiB (mean of {MATCHERS_FOR_MEMORY}, schema a)",
                "process peak RSS MiB",
            ],
            rows,
        )
    )
    print("\nHeap KiB per compiled grammar:\n")
    rows = [
        [name]
        + [get(lib, "memory").get("per_grammar_kb", {}).get(name) for lib in libs]
        for name in GRAMMARS
    ]
    print(table(["grammar"] + libs, rows))
