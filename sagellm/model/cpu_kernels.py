"""sagellm's fused CPU kernels (csrc/): compiled once per machine with the system
C++ compiler against the installed torch, cached, and registered as `torch.ops.sagellm.*`.

They need x86-64 with AVX-512 (x86-64-v4: Intel Skylake-SP and later, AMD Zen 4 and later). Where
that, a compiler or the build is missing, `load()` says why once and returns None, and callers
keep the torch operators they replace (slower; the same greedy tokens in float32, while in bf16
an answer may part at a near tie, see docs/performance.md). CPU_KERNELS=false turns them off.
Measured on this project's 2-core machines: docs/performance.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "cpu_kernels.cpp", CSRC / "decode_attention.cpp", CSRC / "sampler.cpp",
           CSRC / "prefill_attention.cpp", CSRC / "lora.cpp", CSRC / "gemm_rows.cpp")
HEADERS = (CSRC / "simd.h", CSRC / "sampler_draw.h", CSRC / "flash_softmax.h")
# x86-64-v4 = AVX-512 F/BW/CD/DQ/VL: the build runs on any such CPU, not only the one it was
# compiled on (an image is built on one machine and run on another). No contraction of a multiply
# and an add into one FMA: the kernels round where torch's separate operators round.
FLAGS = ("-O3", "-march=x86-64-v4", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w")
DTYPES = (torch.float32, torch.bfloat16)  # what every kernel takes (the loader offers them no other)
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def unsupported_reason() -> str | None:
    """Why the kernels cannot run on this machine, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.machine()} is not x86-64"
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return "the CPU lacks " + ", ".join(missing)
    if not torch.backends.openmp.is_available():
        return "this torch build has no OpenMP"
    return None


def has_bf16_dot() -> bool:
    """Whether the CPU has AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later), which the
    flash_prefill_attention kernel needs; the build itself targets x86-64-v4 only."""
    if "bf16_dot" not in _state:
        _state["bf16_dot"] = "avx512_bf16" in _cpu_flags()
    return bool(_state["bf16_dot"])


def library_path(cache_dir: Path) -> Path:
    """Where the build for this source, torch and compiler flags lives."""
    code = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(code + torch.__version__.encode() + " ".join(FLAGS).encode() +
                         str(torch._C._GLIBCXX_USE_CXX11_ABI).encode()).hexdigest()[:16]
    return cache_dir / "kernels" / f"sagellm_cpu_kernels-{key}.so"


def build(target: Path) -> None:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, abi, *includes, *map(str, SOURCES), "-o", tmp, *libs, "-ltorch_cpu", "-lc10"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: ranks building at once each leave a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(cache_dir: Path | str | None = None):
    """torch.ops.sagellm with the kernels registered, or None where they cannot be had (logged
    once). Builds into `cache_dir`/kernels on first use (about 10 s), or into the temp folder
    when that is not writable."""
    with _lock:
        if "ops" in _state:
            return _state["ops"]
        ops = None
        reason = unsupported_reason()
        if reason is None:
            try:
                ops = _load(Path(cache_dir) if cache_dir else Path.home() / ".cache" / "sagellm")
            except Exception as exc:  # noqa: BLE001 - any failure means the torch path, said once
                reason = str(exc)
        if ops is None:
            log.warning("fused CPU kernels off (%s); using torch operators", reason)
        _state["ops"] = ops
        return ops


def _load(cache_dir: Path):
    candidates = [library_path(cache_dir), library_path(Path(tempfile.gettempdir()) / "sagellm")]
    path = next((p for p in candidates if p.exists()), None)
    errors = []
    for p in candidates if path is None else ():
        try:
            _build_once(p)
            path = p
            break
        except OSError as exc:  # not writable: try the next place
            errors.append(f"{p.parent}: {exc}")
    if path is None:
        raise RuntimeError("; ".join(errors))
    torch.ops.load_library(str(path))
    return torch.ops.sagellm


def _build_once(target: Path) -> None:
    """Build unless another process (a tensor-parallel rank) has, one builder at a time."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            build(target)
            log.info("built fused CPU kernels: %s", target)


def main() -> int:
    """Build into SAGELLM_CACHE_DIR (the image build runs this, on whatever CPU it has)."""
    from sagellm.model.bundled import default_cache_dir
    from sagellm.settings import Settings

    target = library_path(default_cache_dir(Settings.from_env().cache_dir))
    _build_once(target)
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
