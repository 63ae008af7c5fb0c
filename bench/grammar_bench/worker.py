"""The worker side of bench/grammar_compare.py: runs the measurements for one library, one task
at a time, printing @@START / @@DONE lines for the parent."""

from __future__ import annotations

import gc
import json
import time
from typing import Any

from grammar_bench.backends import BACKENDS, Backend
from grammar_bench.fixtures import (BATCH, FEATURES, GRAMMARS, INVALID_SCHEMAS, MATCHERS_FOR_MEMORY, PERSON_INSTANCE,
                                    PERSON_SCHEMA, WALK_REPS, CompileError, first_line)
from grammar_bench.probes import heap_bytes, now_us, percentile, rss_mb, torch_apply


class Worker:
    def __init__(self, lib: str, tokenizer_path: str) -> None:
        self.lib = lib
        self.tokenizer_path = tokenizer_path
        self.backend: Backend | None = None
        self.compiled: dict[str, Any] = {}

    # -- shared helpers ---------------------------------------------------------------
    def _load_hf(self) -> None:
        """Load torch and the HF tokenizer (not under test); idempotent."""
        if hasattr(self, "hf_tok"):
            return
        import torch
        import transformers

        self.torch = torch
        self.hf_tok = transformers.AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.vocab_size = len(self.hf_tok)
        self.words = (self.vocab_size + 31) // 32

    def ready(self) -> Backend:
        if self.backend is None:
            self._load_hf()
            backend = BACKENDS[self.lib]()
            backend.setup(self.hf_tok, self.vocab_size)
            self.backend = backend
        return self.backend

    def grammar(self, name: str) -> Any:
        if name not in self.compiled:
            kind, spec, _ = GRAMMARS[name]
            self.compiled[name] = self.ready().compile(kind, spec)
        return self.compiled[name]

    def encode(self, text: str) -> list[int]:
        return self.hf_tok.encode(text, add_special_tokens=False)

    def bitmask(self, rows: int):
        return self.torch.full((rows, self.words), -1, dtype=self.torch.int32)

    def accepts(self, compiled: Any, text: str) -> bool:
        backend = self.ready()
        matcher = backend.new_matcher(compiled)
        return all(
            backend.consume(matcher, t) for t in self.encode(text)
        ) and backend.is_accepting(matcher)

    # -- tasks ------------------------------------------------------------------------
    def task_setup(self) -> dict:
        self._load_hf()
        rss0, _ = rss_mb()
        t0 = time.perf_counter()
        backend = BACKENDS[self.lib]()  # importing the library counts as part of setup
        import_ms = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        backend.setup(self.hf_tok, self.vocab_size)
        cold_ms = (time.perf_counter() - t0) * 1000
        rss1, _ = rss_mb()
        t0 = time.perf_counter()
        BACKENDS[self.lib]().setup(self.hf_tok, self.vocab_size)
        repeat_ms = (time.perf_counter() - t0) * 1000
        self.backend = backend
        gc.collect()
        return {
            "import_ms": import_ms,
            "cold_ms": cold_ms,
            "repeat_ms": repeat_ms,
            "rss_delta_mb": rss1 - rss0,
        }

    def task_compile(self, name: str) -> dict:
        backend = self.ready()
        kind, spec, sample = GRAMMARS[name]
        out: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            compiled = backend.compile(kind, spec)
            out["first_ms"] = (time.perf_counter() - t0) * 1000
        except CompileError as exc:
            return {"error": first_line(exc)}
        t0 = time.perf_counter()
        backend.compile(kind, spec)
        out["repeat_ms"] = (time.perf_counter() - t0) * 1000
        if backend.has_cache:  # also a real recompile, bypassing the cache
            backend.clear_cache()
            t0 = time.perf_counter()
            backend.compile(kind, spec)
            out["nocache_ms"] = (time.perf_counter() - t0) * 1000
        # Time to first mask on a fresh matcher: catches work a library defers past compile.
        mask = self.bitmask(1)
        t0 = now_us()
        backend.fill(backend.new_matcher(compiled), mask, 0)
        out["first_mask_us"] = now_us() - t0
        out["sample_ok"] = self.accepts(compiled, sample)
        out["size_bytes"] = backend.compiled_size(compiled)
        self.compiled[name] = compiled
        return out

    def task_memory(self) -> dict:
        """Runs in a fresh process. Heap = bytes malloc'ed (native allocations of the library)."""
        self._load_hf()
        gc.collect()
        heap0, rss0 = heap_bytes(), rss_mb()[0]
        backend = self.ready()
        gc.collect()
        heap1, rss1 = heap_bytes(), rss_mb()[0]
        per_grammar = {}
        for name in GRAMMARS:
            before = heap_bytes()
            try:
                self.grammar(name)
                gc.collect()
                per_grammar[name] = (heap_bytes() - before) / 1024
            except CompileError:
                per_grammar[name] = None
        heap2, rss2 = heap_bytes(), rss_mb()[0]

        compiled = self.grammar("a) nested schema")
        prefix = self.encode(json.dumps(PERSON_INSTANCE))[:12]
        mask = self.bitmask(1)

        def make_matchers(count: int) -> list:
            matchers = []
            for _ in range(count):
                m = backend.new_matcher(compiled)
                for t in prefix:
                    backend.consume(m, t)
                backend.fill(m, mask, 0)
                matchers.append(m)
            return matchers

        make_matchers(
            20
        )  # warm lazily built state (e.g. lexer caches) before measuring
        gc.collect()
        heap3 = heap_bytes()
        matchers = make_matchers(MATCHERS_FOR_MEMORY)
        gc.collect()
        heap4 = heap_bytes()
        del matchers
        return {
            "setup_heap_mb": (heap1 - heap0) / 2**20,
            "setup_rss_mb": rss1 - rss0,
            "compile_all_heap_mb": (heap2 - heap1) / 2**20,
            "compile_all_rss_mb": rss2 - rss1,
            "per_grammar_kb": per_grammar,
            "per_matcher_kb": (heap4 - heap3) / 1024 / MATCHERS_FOR_MEMORY,
            "peak_mb": rss_mb()[1],
        }

    def task_walk(self) -> dict:
        backend, torch = self.ready(), self.torch
        compiled = self.grammar("a) nested schema")
        tokens = self.encode(json.dumps(PERSON_INSTANCE))
        eos = self.hf_tok.eos_token_id
        mask = self.bitmask(1)
        base = torch.randn(self.vocab_size, dtype=torch.float32)
        logits = base.clone()
        t0 = time.perf_counter()
        backend.apply(logits, mask)  # torch.compile'd kernels compile on first call
        warmup_ms = (time.perf_counter() - t0) * 1000

        fill_us: list[float] = []
        apply_us: list[float] = []
        ref_us: list[float] = []
        same_as_ref = True
        first_walk_ms = 0.0
        all_allowed = True
        accepting = eos_allowed = False
        for rep in range(WALK_REPS + 1):
            matcher = backend.new_matcher(compiled)
            walk_start = time.perf_counter()
            for token in tokens:
                t0 = now_us()
                backend.fill(matcher, mask, 0)
                t1 = now_us()
                logits.copy_(base)
                t2 = now_us()
                backend.apply(logits, mask)
                t3 = now_us()
                reference = base.clone()
                t4 = now_us()
                torch_apply(reference, mask)
                t5 = now_us()
                bit_set = (int(mask[0, token // 32]) >> (token % 32)) & 1 == 1
                allowed = bit_set and bool(logits[token] != float("-inf"))
                consumed = backend.consume(matcher, token)
                all_allowed &= allowed and consumed
                if rep > 0:  # rep 0 is the cold walk
                    fill_us.append(t1 - t0)
                    apply_us.append(t3 - t2)
                    ref_us.append(t5 - t4)
                    same_as_ref &= bool(torch.equal(reference, logits))
            if rep == 0:
                first_walk_ms = (time.perf_counter() - walk_start) * 1000
            accepting = backend.is_accepting(matcher)
            backend.fill(matcher, mask, 0)
            eos_allowed = (int(mask[0, eos // 32]) >> (eos % 32)) & 1 == 1
        return {
            "tokens": len(tokens),
            "mask_mean_us": sum(fill_us) / len(fill_us),
            "mask_p50_us": percentile(fill_us, 50),
            "mask_p99_us": percentile(fill_us, 99),
            "apply_mean_us": sum(apply_us) / len(apply_us),
            "apply_p50_us": percentile(apply_us, 50),
            "apply_p99_us": percentile(apply_us, 99),
            "apply_warmup_ms": warmup_ms,
            "ref_apply_mean_us": sum(ref_us) / len(ref_us),
            "same_as_ref": same_as_ref,
            "first_walk_ms": first_walk_ms,
            "all_allowed": all_allowed,
            "accepting": accepting,
            "eos_allowed": eos_allowed,
        }

    def task_batch(self) -> dict:
        backend, torch = self.ready(), self.torch
        compiled = self.grammar("a) nested schema")
        roles = PERSON_SCHEMA["properties"]["role"]["enum"]
        sequences = []
        for i in range(BATCH):  # 16 different, valid documents of different lengths
            doc = dict(
                PERSON_INSTANCE,
                name=f"user {i} " + "x" * (i * 3),
                age=i * 7,
                role=roles[i % 3],
                tags=[f"t{j}" for j in range(1 + i % 4)],
            )
            sequences.append(self.encode(json.dumps(doc)))
        mask = self.bitmask(BATCH)
        base = torch.randn(BATCH, self.vocab_size, dtype=torch.float32)
        logits = base.clone()
        backend.apply(logits, mask)  # warm-up (torch.compile, batch shape)

        loop_mask = self.bitmask(BATCH)
        fill_us, loop_us, apply_us, consume_us = [], [], [], []
        all_ok = same_masks = True
        for rep in range(4):
            matchers = [backend.new_matcher(compiled) for _ in range(BATCH)]
            for step in range(max(map(len, sequences))):
                t0 = now_us()
                backend.fill_batch(matchers, mask)
                t1 = now_us()
                for row, m in enumerate(matchers):  # the same, one matcher at a time
                    backend.fill(m, loop_mask, row)
                loop_us.append(now_us() - t1)
                same_masks &= bool(torch.equal(mask, loop_mask))
                logits.copy_(base)
                t2 = now_us()
                backend.apply(logits, mask)
                t3 = now_us()
                live = [i for i, seq in enumerate(sequences) if step < len(seq)]
                ok = backend.consume_batch(
                    [matchers[i] for i in live], [sequences[i][step] for i in live]
                )
                t4 = now_us()
                all_ok &= all(ok)
                if rep > 0:
                    fill_us.append(t1 - t0)
                    apply_us.append(t3 - t2)
                    consume_us.append(t4 - t3)
            all_ok &= all(backend.is_accepting(m) for m in matchers)
        return {
            "steps": max(map(len, sequences)),
            "fill_mean_us": sum(fill_us) / len(fill_us),
            "fill_p99_us": percentile(fill_us, 99),
            "loop_mean_us": sum(loop_us) / len(loop_us),
            "apply_mean_us": sum(apply_us) / len(apply_us),
            "consume_mean_us": sum(consume_us) / len(consume_us),
            "all_ok": all_ok and same_masks,
        }

    def task_feature(self, name: str) -> dict:
        backend = self.ready()
        schema, valid, invalid = FEATURES[name]
        t0 = time.perf_counter()
        try:
            compiled = backend.compile("schema", schema)
        except CompileError as exc:
            return {"verdict": "ERR", "message": first_line(exc)}
        ms = (time.perf_counter() - t0) * 1000
        if not self.accepts(compiled, json.dumps(valid)):
            return {"verdict": "rejects valid", "ms": ms}
        if self.accepts(compiled, json.dumps(invalid)):
            return {"verdict": "ignored (accepts invalid)", "ms": ms}
        return {"verdict": "OK", "ms": ms}

    def task_invalid(self, name: str) -> dict:
        backend = self.ready()
        try:
            backend.compile("schema", INVALID_SCHEMAS[name])
        except CompileError as exc:
            return {"verdict": "error", "message": first_line(exc)}
        return {"verdict": "accepted silently"}


def task_list(group: str) -> list[str]:
    if (
        group == "memory"
    ):  # needs a process of its own: compiling earlier would skew RSS
        return ["memory"]
    return (
        ["setup"]
        + [f"compile:{n}" for n in GRAMMARS]
        + ["walk", "batch"]
        + [f"feature:{n}" for n in FEATURES]
        + [f"invalid:{n}" for n in INVALID_SCHEMAS]
    )


def run_tasks(worker: Worker, group: str, start: int) -> None:
    names = task_list(group)[start:]
    # Shared preparation happens before the first task so that it does not count against
    # a task's timeout; "setup" and "memory" measure the library's own setup themselves.
    if names and names[0] in ("setup", "memory"):
        worker._load_hf()
    elif names:
        worker.ready()
    for name in names:
        print("@@START " + json.dumps(name), flush=True)
        kind, _, arg = name.partition(":")
        method = getattr(worker, f"task_{kind}")
        try:
            result = method(arg) if arg else method()
        except Exception as exc:  # noqa: BLE001 - record a bug/unexpected library error, go on
            result = {"exception": f"{type(exc).__name__}: {first_line(exc)}"}
        print("@@DONE " + json.dumps([name, result]), flush=True)
