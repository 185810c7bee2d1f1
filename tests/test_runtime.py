"""Allocator tuning: applied once per process on glibc, switched off by QDIFF_MALLOC_TUNING=0."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from qdiff.runtime import tune_allocator as t; print(t(), t())"


def _run(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "QDIFF_MALLOC_TUNING"}
    if env_value is not None:
        env["QDIFF_MALLOC_TUNING"] = env_value
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_tuning_applies_once_and_can_be_switched_off():
    assert _run(None) == "True True"
    assert _run("0") == "False False"
