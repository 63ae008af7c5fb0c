"""Compare constrained-decoding grammar libraries on CPU: llguidance, xgrammar, outlines-core.

For each library this measures tokenizer setup, grammar compile time, per-token mask and
apply cost (single sequence and a batch of 16), JSON-schema feature coverage (including
whether a keyword is really enforced or silently ignored), error behaviour on invalid
schemas, and memory.  Each library runs in its own subprocess so that memory numbers are
not mixed up and a crash or hang in one library cannot take the whole run down.

    HF_HUB_OFFLINE=1 python bench/grammar_compare.py [--tokenizer PATH] [--libs a,b]

Needs: torch, transformers, llguidance, xgrammar, outlines-core (missing ones are reported).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from grammar_bench.fixtures import (DEFAULT_TOKENIZER, FEATURES, GRAMMARS, LIBS, PERSON_INSTANCE,  # noqa: E402
                                    PERSON_SCHEMA, STARTUP_TIMEOUT_S)
from grammar_bench.report import report  # noqa: E402
from grammar_bench.worker import Worker, run_tasks, task_list  # noqa: E402


def run_library(lib: str, args: argparse.Namespace) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for group in ("main", "memory"):
        results.update(run_group(lib, group, args))
    return results


def run_group(lib: str, group: str, args: argparse.Namespace) -> dict[str, dict]:
    """Run one worker process over the group's tasks; restart it after a crash or hang."""
    tasks = task_list(group)
    results: dict[str, dict] = {}
    start = 0
    while start < len(tasks):
        with tempfile.TemporaryFile() as err:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                lib,
                "--group",
                group,
                "--start",
                str(start),
                "--tokenizer",
                args.tokenizer,
            ]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
            current, buffer = None, b""
            selector = selectors.DefaultSelector()
            selector.register(proc.stdout, selectors.EVENT_READ)
            deadline = (
                time.monotonic() + STARTUP_TIMEOUT_S + args.timeout
            )  # imports, tokenizers
            timed_out = False
            while True:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    timed_out = True
                    proc.kill()
                    break
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace")
                    if line.startswith("@@START "):
                        current = json.loads(line[8:])
                        deadline = time.monotonic() + args.timeout
                    elif line.startswith("@@DONE "):
                        name, result = json.loads(line[7:])
                        results[name] = result
                        current = None
            rc = proc.wait()
            selector.close()
            if current is None:  # finished, or died between tasks (e.g. at import)
                err.seek(0)
                tail = err.read().decode("utf-8", "replace").strip().splitlines()[-2:]
                for name in tasks[start:]:
                    results.setdefault(
                        name,
                        {"exception": f"worker exited rc={rc}: {' | '.join(tail)}"},
                    )
                break
            if timed_out:
                results[current] = {
                    "timeout": f"no result after {args.timeout:.0f}s (killed)"
                }
            else:
                err.seek(0)
                tail = err.read().decode("utf-8", "replace").strip().splitlines()[-1:]
                results[current] = {
                    "crash": f"process died rc={rc}: {' | '.join(tail)}"
                }
            start = tasks.index(current) + 1
    return results


def check_fixtures() -> str:
    """Confirm with the jsonschema package that each 'valid'/'invalid' instance really is."""
    try:
        import jsonschema
    except ImportError:
        return "fixtures not checked (jsonschema not installed)"
    validator_cls = jsonschema.Draft202012Validator
    checker = validator_cls.FORMAT_CHECKER
    wrong, unchecked = [], []
    cases = [(n, schema, ok, bad) for n, (schema, ok, bad) in FEATURES.items()]
    cases.append(("person", PERSON_SCHEMA, PERSON_INSTANCE, None))
    cases += [
        (n, spec, json.loads(sample), None)
        for n, (kind, spec, sample) in GRAMMARS.items()
        if kind == "schema"
    ]
    for name, schema, ok, bad in cases:
        validator = validator_cls(schema, format_checker=checker)
        if not validator.is_valid(ok):
            wrong.append(f"{name} (valid instance fails)")
        if bad is not None and validator.is_valid(bad):
            fmt = schema.get("format")
            (unchecked if fmt and fmt not in checker.checkers else wrong).append(name)
    text = "fixtures checked with jsonschema: " + (
        "all as labelled" if not wrong else "WRONG: " + ", ".join(wrong)
    )
    return text + (
        f" (not checkable here: {', '.join(unchecked)})" if unchecked else ""
    )


def versions(libs: list[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {sys.version.split()[0]}"]
    for pkg in ["torch", "transformers", "tokenizers", *libs]:
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return ", ".join(parts) + f"; {os.cpu_count()} CPUs; load average at start {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", default=DEFAULT_TOKENIZER, help="HF tokenizer folder"
    )
    parser.add_argument(
        "--libs",
        default=",".join(LIBS),
        help="comma-separated subset of " + ", ".join(LIBS),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds allowed per task before kill",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--group", default="main", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_tasks(Worker(args.worker, args.tokenizer), args.group, args.start)
        return

    started = time.perf_counter()
    libs = [lib.strip() for lib in args.libs.split(",") if lib.strip()]
    unknown = set(libs) - set(LIBS)
    if unknown:
        parser.error(f"unknown libraries: {', '.join(sorted(unknown))}")
    print(f"# Grammar library comparison\n\ntokenizer: {args.tokenizer}\n")
    print(f"{versions(libs)}\n\n{check_fixtures()}")
    results = {}
    for lib in libs:
        t0 = time.perf_counter()
        results[lib] = run_library(lib, args)
        print(f"\n({lib}: {time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    report(results, libs)
    print(f"\nTotal run time: {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
