"""Deprecated name of :mod:`qdiff.run` (the Hydra run of one composed config), kept for one release: it was easy to
confuse with :mod:`qdiff.pipelines` (diffusers pipelines)."""
from __future__ import annotations

import warnings

from qdiff.run import artifact_facts, quant_summary, recon_dir, run  # noqa: F401

warnings.warn("qdiff.pipeline is renamed qdiff.run (the run of one composed config); qdiff.pipeline goes away in the "
              "next release", DeprecationWarning, stacklevel=2)
