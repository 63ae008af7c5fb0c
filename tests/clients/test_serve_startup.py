"""The `serve` entrypoint as SageMaker runs it: bad settings stop it with one line naming the
variable, a bad model path stops it naming the path, secrets are masked in the printed config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVE = [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "serve"), "serve"]
if not Path(SERVE[0]).exists():
    SERVE[0] = sys.executable
SECRET = "hf_secretvalue123"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_MODEL_ID", "MODEL_ID", "SM_NUM_GPUS", "NUM_SHARD", "HF_TOKEN",
                        "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "API_KEY")}
    env.update({"HF_HUB_OFFLINE": "1", "PORT": str(free_port()), "LOG_LEVEL": "info",
                "SM_MODEL_DIR": str(ROOT / "tests" / "no-such-model-dir"), "MAX_CONCURRENT_REQUESTS": "4"})
    env.update(extra)
    return env


class Proc:
    """`serve serve` with stdout and stderr merged and collected by a thread."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None):
        self.port = int(env["PORT"])
        self.proc = subprocess.Popen(SERVE if args is None else [*SERVE[:2], *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._buf: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            with self._lock:
                self._buf.append(line)

    @property
    def output(self) -> str:
        with self._lock:
            return b"".join(self._buf).decode(errors="replace")

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.proc.poll() is not None:
                self._reader.join(5)
                return predicate()
            time.sleep(0.1)
        return False

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.kill()
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._reader.join(5)


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["-h"]])
def test_help_exits_0(args):
    p = Proc(base_env(), args=args)
    rc = p.wait(30)
    assert rc == 0, p.output
    assert "serve" in p.output
    # and it neither read the settings nor started a server
    assert "model_id=" not in p.output and "Listening" not in p.output, p.output


def test_bad_sm_num_gpus_exits_with_one_line():
    p = Proc(base_env(SM_NUM_GPUS="abc"))
    t0 = time.monotonic()
    rc = p.wait(30)
    elapsed = time.monotonic() - t0
    out = p.output
    assert rc != 0, out
    assert elapsed < 15, f"took {elapsed:.1f}s to refuse a bad setting"
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{out}"
    assert "SM_NUM_GPUS" in lines[0] and "abc" in lines[0], lines[0]
    assert "Traceback" not in out


def test_bad_setting_does_not_leak_the_token():
    p = Proc(base_env(SM_NUM_GPUS="abc", HF_TOKEN=SECRET))
    rc = p.wait(30)
    assert rc != 0
    assert SECRET not in p.output, p.output


def test_bad_secret_value_is_masked_in_the_error():
    # Two token aliases that disagree: the error must name them, not print either value.
    p = Proc(base_env(HF_TOKEN=SECRET, HUGGING_FACE_HUB_TOKEN="hf_othervalue456"))
    rc = p.wait(30)
    out = p.output
    assert rc != 0, out
    assert SECRET not in out and "hf_othervalue456" not in out, out
    assert "HF_TOKEN" in out and "HUGGING_FACE_HUB_TOKEN" in out, out


def test_missing_model_dir_exits_naming_the_path():
    p = Proc(base_env(HF_MODEL_ID="/nonexistent/dir"))
    t0 = time.monotonic()
    try:
        rc = p.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after 60 s:\n{p.output[-3000:]}") from None
    out = p.output
    assert rc != 0, out
    assert time.monotonic() - t0 < 60
    assert any("/nonexistent/dir" in line and "error" in line.lower() for line in out.splitlines()), out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_token_is_masked_in_the_printed_configuration():
    env = base_env(HF_TOKEN=SECRET)
    p = Proc(env)
    try:
        assert p.wait_for(lambda: "hf_token=" in p.output, 30), p.output[-3000:]
        # Let it start fully, so every later log line (model load, gunicorn) is covered too.
        url = f"http://127.0.0.1:{p.port}/ping"

        def ready():
            try:
                return requests.get(url, timeout=2).status_code == 200
            except requests.RequestException:
                return False

        assert p.wait_for(ready, 120), p.output[-3000:]
    finally:
        p.kill()
    out = p.output
    assert SECRET not in out, "the token leaked into the output"
    token_lines = [line for line in out.splitlines() if "hf_token=" in line]
    assert len(token_lines) == 1, token_lines
    line = token_lines[0]
    assert "HF_TOKEN" in line, f"the source variable is not shown: {line!r}"
    assert "***" in line, line


def test_token_alias_is_named_in_the_printed_configuration():
    p = Proc(base_env(HF_API_TOKEN=SECRET))
    try:
        assert p.wait_for(lambda: "hf_token=" in p.output and "\n" in p.output.split("hf_token=", 1)[1], 30), \
            p.output[-3000:]
    finally:
        p.kill()
    out = p.output
    assert SECRET not in out
    line = next(line for line in out.splitlines() if "hf_token=" in line)
    assert "HF_API_TOKEN" in line and "***" in line, line
