"""One static, self-contained HTML page (figures embedded as base64 PNG) for a report."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1150px;color:#1f2328;padding:0 16px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.meta{color:#59636e;font-size:13px}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even) td{background:#fbfcfd}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;margin-right:6px;font-size:12px;font-weight:600;color:#fff}
.completed{background:#1a7f37}.running,.pending{background:#0969da}.failed,.cancelled,.timeout{background:#cf222e}
.incomplete,.missing{background:#bf8700}.reference{background:#6e7781}
td.state span{color:#fff;border-radius:4px;padding:0 6px}
img{max-width:100%;border:1px solid #d0d7de;margin:6px 0}.note{background:#fff8c5;padding:6px 10px;border-radius:6px}
.small{font-size:12px;color:#59636e}
"""
NUMERIC_HEADERS = {"FID↓ [95 %]", "IS↑", "ΔFID vs FP", "KID↓", "MSE vs FP", "Recovered [paired 95 %]", "Recon (s)", "Total (s)", "Peak RSS (MB)", "fid",
                   "restarts", "job", "FP FID", "Linear FID", "FID", "Recovered (mean)", "Lowest bound"}


def _table(df: pd.DataFrame, link_col: str | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for r in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, r):
            s = "" if v is None or v is pd.NA or (isinstance(v, float) and pd.isna(v)) else str(v)
            if c in ("State", "state"):
                cells.append(f'<td class="state"><span class="{html.escape(s)}">{html.escape(s)}</span></td>')
            elif c == link_col and s:
                cells.append(f'<td><a href="{html.escape(s)}/">{html.escape(s)}</a></td>')
            else:
                cls = ' class="num"' if c in NUMERIC_HEADERS else ""
                cells.append(f"<td{cls}>{html.escape(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption class="small">{html.escape(alt)}</figcaption></figure>'


def render(title: str, root: Path, counts: dict[str, int], notes: list[str], table: pd.DataFrame,
           jobs: pd.DataFrame, figures: dict[str, Path], generated: str, per_recon: pd.DataFrame | None = None) -> str:
    badges = "".join(f'<span class="badge {html.escape(s)}">{n} {html.escape(s)}</span>' for s, n in counts.items())
    total = sum(counts.values())
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(str(root))} · generated {html.escape(generated)} · {total} job(s)</p>",
        f"<p>{badges}</p>",
        *[f"<p class='note'>{html.escape(n)}</p>" for n in notes],
        "<h2>Results</h2>", _table(table),
        "<p class='small'>ΔFID vs FP: the run's FID minus the FID of the full-precision model with the same sampler, "
        "steps, samples and seed. Recovered: share of linear quantization's FID gap to FP that Q-Diffusion closes at "
        "the same bits and sampling seed, with a paired bootstrap 95 % interval (the three sample sets share their "
        "noises) where the runs saved their features. Cost: reconstruction and total pipeline seconds, peak resident "
        "memory. Rows that did not complete stay in the table with their state.</p>",
    ]
    if per_recon is not None and len(per_recon):
        parts += ["<h2>Recovered share per reconstruction</h2>", _table(per_recon),
                  "<p class='small'>Each reconstruction over its sampling seeds: the mean share, each seed's share "
                  "with its paired 95 % interval, the lowest bound.</p>"]
    names = {"fid_vs_bits": "FID vs weight bits", "step_mse": "Per-step MSE of the quantized noise prediction (all runs)",
             "act_ranges": "FP activation ranges over timesteps", "samples": "Sample grids of the completed runs (first 16), titled with method, bits and FID"}
    if figures:
        parts.append("<h2>Figures</h2>")
        for key, p in figures.items():
            parts.append(_img(p, names.get(key, key)))
    parts += ["<h2>All jobs</h2>", _table(jobs, link_col="dir"), "</body></html>"]
    return "\n".join(parts)
