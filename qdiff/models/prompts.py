"""Caption files for text-guided calibration and evaluation (the paper samples MS-COCO captions for SD)."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from qdiff.models.base import ModelConfigError, WeightsNotFoundError


def load_captions(path: str | Path) -> list[str]:
    """Captions from a COCO annotation JSON, a TSV with a ``caption`` column, or a TXT with one per line.

    Whitespace is stripped and empty captions are dropped, so every prompt the sampler sees is real text.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"caption file '{path}' does not exist; set model.prompts to a COCO JSON, TSV or TXT file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"cannot read caption file '{path}': {e}") from None

    suffix = path.suffix.lower()
    if suffix == ".json":
        captions = _from_coco_json(text, path)
    elif suffix in (".tsv", ".csv"):
        captions = _from_table(text, path, "\t" if suffix == ".tsv" else ",")
    else:
        captions = text.splitlines()
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise ModelConfigError(f"caption file '{path}' holds no captions")
    return captions


def _from_coco_json(text: str, path: Path) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"caption file '{path}' is not valid JSON ({e.msg} at line {e.lineno})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ModelConfigError(f"caption file '{path}' has no 'annotations' list (expected COCO captions_*.json)")
    return [a.get("caption", "") for a in anns if isinstance(a, dict)]


def _from_table(text: str, path: Path, delimiter: str) -> list[str]:
    rows = csv.reader(text.splitlines(), delimiter=delimiter)
    header = next(rows, None) or []
    names = [h.strip().lower() for h in header]
    if "caption" not in names:
        raise ModelConfigError(f"caption file '{path}' has no 'caption' column in its header (found: {', '.join(names) or 'nothing'})")
    col = names.index("caption")
    return [r[col] for r in rows if len(r) > col]


def sample_prompts(captions: list[str], n: int, seed: int) -> list[str]:
    """``n`` captions drawn without replacement (with replacement when ``n`` exceeds the list), same for a seed."""
    if n < 0:
        raise ModelConfigError(f"number of prompts must be >= 0, got {n}")
    if not captions:
        raise ModelConfigError("cannot sample prompts from an empty caption list")
    rng = random.Random(seed)
    if n <= len(captions):
        return rng.sample(captions, n)
    return [captions[rng.randrange(len(captions))] for _ in range(n)]


__all__ = ["load_captions", "sample_prompts"]
