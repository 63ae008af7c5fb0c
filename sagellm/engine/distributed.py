"""Tensor parallelism over SM_NUM_GPUS ranks (NCCL on GPU, gloo on CPU): rank 0 runs the server and
the scheduler; follower ranks, started by rank 0, load their shard of the weights (transformers'
TP plan) and run every forward step rank 0 broadcasts."""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from sagellm.errors import SettingsError

log = logging.getLogger(__name__)

# An idle server broadcasts nothing; followers must wait as long as it takes.
_NO_TIMEOUT = datetime.timedelta(days=3650)


def valid_degrees(num_heads: int, num_kv_heads: int, limit: int) -> list[int]:
    g = math.gcd(num_heads, num_kv_heads)
    return [d for d in range(1, limit + 1) if g % d == 0]


def check_degree(requested: int, config, device: str) -> int:
    """The tensor-parallel degree to run, or a one-line error listing the values that would work."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    visible = torch.cuda.device_count() if device == "cuda" else None
    limit = visible if visible is not None else math.gcd(heads, kv_heads)
    ok = valid_degrees(heads, kv_heads, max(limit, 1))
    if requested == -1:  # "max": every visible device the heads allow
        return ok[-1] if visible is not None else 1
    if visible is not None and requested > visible:
        raise SettingsError(f"SM_NUM_GPUS={requested} but only {visible} GPU(s) are visible; "
                            f"use one of {ok}")
    if heads % requested or kv_heads % requested:
        raise SettingsError(f"SM_NUM_GPUS={requested} does not divide the model's {heads} attention heads "
                            f"and {kv_heads} KV heads; use one of {ok}")
    return requested


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int, device: str) -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        # N ranks share the host's cores: one thread each, or they spin against each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=_NO_TIMEOUT)


class TPGroup:
    """Rank 0's side: the follower processes and the step broadcast."""

    def __init__(self, world: int, device: str, model_path: str):
        self.world = world
        self.device = device
        port = _free_port()
        # LOCAL_RANK is how transformers' TP loader picks this rank's GPU.
        self.followers = [
            subprocess.Popen([sys.executable, "-m", "sagellm.engine.distributed", str(rank), str(world),
                              str(port), device, model_path],
                             env={**os.environ, "LOCAL_RANK": str(rank), "RANK": str(rank),
                                  "WORLD_SIZE": str(world)})
            for rank in range(1, world)
        ]
        _init(0, world, port, device)
        self._closed = False

    def dead_followers(self) -> list[int]:
        return [rank for rank, p in enumerate(self.followers, start=1) if p.poll() is not None]

    def send(self, obj) -> None:
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())

    def broadcast_step(self, step) -> None:
        self.send(("step", step))

    def _comm_device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else None

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.dead_followers():
                self.send(("stop", None))
        except Exception:  # a follower is already gone; terminate the rest below
            pass
        for p in self.followers:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _die_with_parent() -> None:
    """No follower outlives rank 0. (PR_SET_PDEATHSIG would fire when the *thread* that started
    us ends, and rank 0 starts followers from its loading thread; so watch the parent instead.)"""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def follower_main(rank: int, world: int, port: int, device: str, model_path: str) -> int:
    from sagellm.engine.kv_cache import PagedKVCache
    from sagellm.engine.runner import ModelRunner
    from sagellm.model.loader import load_weights
    from sagellm.settings import Settings

    _die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s: %(message)s")
    _init(rank, world, port, device)
    settings = Settings.from_env()
    dev = f"cuda:{rank}" if device == "cuda" else "cpu"
    model = load_weights(model_path, settings, dev, tp_size=world)
    comm = torch.device("cuda", rank) if device == "cuda" else None
    runner = None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, device=comm)
        kind, payload = box[0]
        if kind == "stop":
            return 0
        if kind == "cache":  # (num_blocks, block_size, num_layers, kv_heads, head_dim, dtype)
            num_blocks, block_size, layers, kv_heads, head_dim, dtype = payload
            cache = PagedKVCache(layers, num_blocks, block_size, kv_heads, head_dim, dtype, dev)
            runner = ModelRunner(model, cache, dev)
        elif kind == "step":
            try:
                runner.forward(payload)
            except Exception:  # rank 0 fails the same step and its requests; keep following
                log.exception("step failed")


if __name__ == "__main__":
    r, w, p, d, path = sys.argv[1:6]
    sys.exit(follower_main(int(r), int(w), int(p), d, path))
