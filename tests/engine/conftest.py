"""Fixtures shared by the engine tests: sagellm's CPU kernels, built."""

from __future__ import annotations

import pytest

from sagellm.model import cpu_kernels


@pytest.fixture(scope="module")
def ops():
    """torch.ops.sagellm. This project's machines (CI's included) have AVX-512 and g++: the kernels
    must be there."""
    k = cpu_kernels.load()
    assert k is not None, cpu_kernels.unsupported_reason() or "the build failed (see the log)"
    return k
