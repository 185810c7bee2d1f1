"""The documentation: the MkDocs site builds with warnings as errors, and every ```python snippet of README.md and
docs/*.md runs as written (each page in order, in one namespace, in a fresh folder)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: Every page with Python snippets, and the test that runs them (a new page with snippets must be added here).
PAGES_WITH_SNIPPETS = {"README.md", "docs/api.md", "docs/orchestration.md"}


@pytest.fixture(autouse=True)
def _one_thread(_cpu_threads):
    """One thread: these models are tiny, so a second one gains nothing and stalls when another job holds a core."""
    torch.set_num_threads(1)


def python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_page(path: Path, namespace: dict | None = None) -> dict:
    namespace = namespace if namespace is not None else {"__name__": "docs"}
    for i, snippet in enumerate(python_snippets(path.read_text())):
        exec(compile(snippet, f"{path.relative_to(ROOT)} python snippet {i + 1}", "exec"), namespace)
    return namespace


def test_every_page_with_snippets_is_run_by_a_test():
    pages = {str(p.relative_to(ROOT)) for p in [README, *sorted(DOCS.rglob("*.md"))] if python_snippets(p.read_text())}
    assert pages == PAGES_WITH_SNIPPETS


def test_snippets_cover_both_entry_points_and_the_readme_is_a_guide():
    code = "\n".join(python_snippets(README.read_text()) + python_snippets((DOCS / "api.md").read_text()))
    for name in ("qdiff.calibration_data", "qdiff.quantize(", "qdiff.quantize_pipeline", "qdiff.save_pipeline",
                 "qdiff.load_pipeline", "qdiff.recon.register_block", "ReconConfig.preset", "split_layers",
                 "qdiff.export", "qdiff.load_deployed"):
        assert name in code, name
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for part in ("## The two commands", "## Python API", "## Configuration", "## Limitations", "## Citation",
                 "## Licence", "## Real components and how they start"):
        assert part in text, part
    assert (ROOT / "LICENSE").is_file()


def test_docs_build_with_warnings_as_errors(tmp_path):
    """``mkdocs build --strict``: a broken link, a missing page or a page left out of the nav fails the suite."""
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (tmp_path / "site" / "parallel" / "index.html").is_file()
    # every docs page is in the nav (mkdocs only warns about omitted files when validation says so: it does)
    assert "omitted_files: warn" in (ROOT / "mkdocs.yml").read_text()


@pytest.mark.slow
def test_every_python_snippet_of_the_readme_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_page(README)
    assert ns["qunet"].qdiff_report["n_units"] > 0 and (tmp_path / "recon_w4a8").is_dir()
    assert type(ns["deployed"]).__name__ == type(ns["unet"]).__name__
    assert len(ns["images"]) == 2 and (tmp_path / "ddim_w4a8" / "unet").is_dir()
    assert ns["pipe2"].unet is not None


@pytest.mark.slow
def test_every_python_snippet_of_the_api_tutorial_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_page(DOCS / "api.md")
    assert len(ns["calib"]) == 40 and len(ns["text_calib"]) == 80
    assert ns["report"]["n_units"] > 0 and (tmp_path / "recon_w4a8").is_dir()
    assert ns["image2"].size == ns["image"].size and (tmp_path / "sd_w4a8" / "unet").is_dir()


@pytest.mark.slow
@pytest.mark.uses_slurm
def test_the_orchestration_snippet_submits_a_run(tmp_path, monkeypatch):
    """Its job goes to SLURM when sbatch is on PATH (then the cluster must answer), else to a local process."""
    if shutil.which("sbatch"):
        up = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=15)
        if up.returncode != 0:
            pytest.skip("sbatch is on PATH but the SLURM cluster does not answer: bash scripts/slurm_local.sh up")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QDIFF_RUN_CWD", str(tmp_path))
    ns = run_page(DOCS / "orchestration.md")
    assert ns["metrics"]["method"] == "qdiff" and (ns["run_dir"] / "metrics.json").is_file()
    assert ns["run_dir"].is_relative_to(tmp_path)
