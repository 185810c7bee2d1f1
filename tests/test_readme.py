"""Every ```python snippet of README.md runs as written: in order, in one namespace, in a fresh folder."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _one_thread(_cpu_threads):
    """One thread: these models are tiny, so a second one gains nothing and stalls when another job holds a core."""
    torch.set_num_threads(1)


def python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_snippets_for_both_entry_points():
    code = "\n".join(python_snippets(README.read_text()))
    for name in ("qdiff.calibration_data", "qdiff.quantize(", "qdiff.quantize_pipeline", "qdiff.save_pipeline",
                 "qdiff.load_pipeline", "qdiff.recon.register_block", "ReconConfig.preset", "split_layers",
                 "qdiff.export", "qdiff.load_deployed"):
        assert name in code, name


@pytest.mark.slow
def test_every_python_snippet_of_the_readme_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    for i, snippet in enumerate(python_snippets(README.read_text())):
        exec(compile(snippet, f"README.md python snippet {i + 1}", "exec"), namespace)
    # what the snippets claim
    assert len(namespace["calib"]) == 40 and len(namespace["text_calib"]) == 80
    assert namespace["report"]["n_units"] > 0 and (tmp_path / "recon_w4a8").is_dir()
    assert namespace["image2"].size == namespace["image"].size and (tmp_path / "sd_w4a8" / "unet").is_dir()
