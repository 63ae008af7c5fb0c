"""SM_NUM_GPUS=3 on CPU (gloo): the bundled model's 9 heads / 3 KV heads split over 3 ranks, and
the answers equal the single-rank server's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import requests

from conftest import ROOT, Server, free_port

PROMPTS = ["What is the capital of France?", "Why is the sky blue?", "Write a haiku about the ocean."]


def ask(url: str, question: str) -> str:
    r = requests.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def followers_of(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True)
                if "sagellm.engine.distributed" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture(scope="module")
def tp_server():
    srv = Server(env={"SM_NUM_GPUS": "3"}, timeout=300)
    yield srv
    srv.stop()


def test_three_ranks_answer_exactly_as_one(server, tp_server):
    for q in PROMPTS:
        assert ask(tp_server.url, q) == ask(server.url, q)
    assert "tensor_parallel=3" in tp_server.log()


def test_sigterm_stops_every_rank(tp_server):
    ranks = followers_of(tp_server.proc.pid)
    assert len(ranks) == 2
    assert tp_server.stop() == 0
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive


def test_a_dead_rank_fails_ping_and_stops_the_server():
    srv = Server(env={"SM_NUM_GPUS": "3"}, timeout=300)
    try:
        ranks = followers_of(srv.proc.pid)
        assert len(ranks) == 2
        ranks[0].kill()
        statuses = []
        deadline = time.monotonic() + 30
        while srv.proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.append(requests.get(srv.url + "/ping", timeout=2).status_code)
            except requests.ConnectionError:
                statuses.append(None)
            time.sleep(0.2)
        assert srv.proc.wait(30) != 0
        assert 503 in statuses  # /ping turned unhealthy before the server went away ...
        assert 200 not in statuses[statuses.index(503):]  # ... and never healthy again
        assert "rank(s) [1] exited" in srv.log()
        psutil.wait_procs(ranks[1:], timeout=10)
        assert not [p for p in ranks[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        srv.stop()


def test_a_degree_that_does_not_divide_the_heads_stops_with_the_valid_values():
    env = {k: v for k, v in os.environ.items() if k != "HF_MODEL_ID"}
    env.update({"SM_NUM_GPUS": "2", "PORT": str(free_port()), "HF_HUB_OFFLINE": "1",
                "SM_MODEL_DIR": str(ROOT / "tests" / "no-such-model-dir")})
    proc = subprocess.run([sys.executable, str(ROOT / "serve"), "serve"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "SM_NUM_GPUS=2 does not divide the model's 9 attention heads and 3 KV heads; use one of [1, 3]" in out
