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


def test_deterministic_switch_composes_sets_the_kernel_flags_and_refuses_a_non_bool(compose_cfg):
    import torch

    from qdiff.errors import ConfigError
    from qdiff.runtime import deterministic_kernels
    from qdiff.spec import build_spec

    assert build_spec(compose_cfg()).deterministic is False
    assert build_spec(compose_cfg("deterministic=true")).deterministic is True
    with pytest.raises(ConfigError, match="deterministic must be true or false"):
        build_spec(compose_cfg("deterministic=sometimes"))
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    try:
        deterministic_kernels()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"]
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic = before[1]
