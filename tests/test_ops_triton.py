"""Runs tests/triton_interpreter_cases.py in a subprocess with TRITON_INTERPRET=1.

Triton reads the variable when kernels are defined, so it must be set before anything imports
the kernel module; a fresh process keeps the interpreter away from the rest of the suite.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_interpreter_cases.py")


def run_under_interpreter(*pytest_args: str) -> subprocess.CompletedProcess:
    """`python -m pytest -q <args>` in a fresh process with TRITON_INTERPRET=1 (and no forced backend)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("VIT_VQ_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=CASES.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_under_the_interpreter():
    proc = run_under_interpreter(str(CASES))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
