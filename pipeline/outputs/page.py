"""The run page: ``OUT/index.html``, one self-contained HTML5 file to glance at after a run.

It lists every input of the report with its state, why it failed or was skipped, timings,
tissue fraction, tiles and preview. It opens offline in any browser: inline CSS, no
fonts, scripts or images from elsewhere; previews are linked by paths relative to the
output root. Everything taken from the report is HTML-escaped. An image that cannot be
loaded is marked ``class="broken"`` / ``data-broken="1"`` in the page, one that loaded
``data-loaded="1"`` (a test looks for both).
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.core.atomic import write_output

__all__ = ["INDEX_NAME", "render_index", "write_index"]

INDEX_NAME = "index.html"

#: States in display order; others the report may hold are shown after them.
_STATES = ("done", "failed", "skipped", "pending")
#: Optional per-input files shown as links when the report names them.
_FILE_FIELDS = (("preview", "preview PNG"), ("geojson", "GeoJSON"), ("labels", "labels"))

_ONERROR = "this.classList.add('broken');this.dataset.broken='1'"
_ONLOAD = "this.dataset.loaded='1'"

_CSS = """
:root{--fg:#1d232a;--muted:#5d6875;--line:#dde2e8;--bg:#f4f6f8;--card:#fff;
--done:#1b873f;--done-bg:#e3f5e8;--failed:#c62828;--failed-bg:#fdecea;
--skipped:#6b7280;--skipped-bg:#eef0f3;--pending:#b26a00;--pending-bg:#fff4e0}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);line-height:1.4;
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:#1f2933;color:#f5f7fa;padding:20px 28px}
header h1{margin:0 0 6px;font-size:20px;font-weight:600}
header .sub{color:#aab4bf;font-size:13px}
header .sub span+span:before{content:"\\00b7";margin:0 8px;color:#6b7785}
.totals{display:flex;flex-wrap:wrap;gap:8px;margin-top:14px}
.chip{display:inline-block;padding:3px 10px;border-radius:999px;font-weight:600;font-size:12px}
.totals .chip{font-size:13px;padding:4px 12px}
.chip.done{background:var(--done-bg);color:var(--done)}
.chip.failed{background:var(--failed-bg);color:var(--failed)}
.chip.skipped{background:var(--skipped-bg);color:var(--skipped)}
.chip.pending,.chip.other{background:var(--pending-bg);color:var(--pending)}
.chip.zero{opacity:.45}
.verdict{font-weight:600}
.verdict.ok{color:#7ee2a0}.verdict.bad{color:#ff9b94}
main{padding:20px 28px 40px}
.metas{display:flex;flex-wrap:wrap;gap:12px;margin:0 0 18px;align-items:flex-start}
details.meta{flex:1 1 300px;background:var(--card);border:1px solid var(--line);
border-radius:8px;padding:8px 14px}
details.meta summary{cursor:pointer;color:var(--muted);font-weight:600}
details.meta table{border-collapse:collapse;margin:8px 0;font-size:12px}
details.meta td{padding:2px 12px 2px 0;vertical-align:top}
details.meta td:first-child{color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:16px}
.card{background:var(--card);border:1px solid var(--line);border-top:4px solid var(--line);
border-radius:8px;overflow:hidden;display:flex;flex-direction:column}
.card.done{border-top-color:var(--done)}
.card.failed{border-top-color:var(--failed)}
.card.skipped{border-top-color:var(--skipped);border-style:dashed;border-top-style:solid}
.card.pending{border-top-color:var(--pending)}
.thumb{display:flex;align-items:center;justify-content:center;height:210px;
background:#e9edf1;border-bottom:1px solid var(--line);color:var(--muted);font-size:13px}
.thumb.none{background:repeating-linear-gradient(135deg,#eef1f4 0 10px,#e6eaee 10px 20px)}
.failed .thumb.none{color:var(--failed)}
.thumb img{width:100%;height:100%;object-fit:contain;display:block}
.thumb img.broken{outline:2px solid var(--failed);min-width:120px;min-height:40px}
.body{padding:12px 14px 14px}
.title{display:flex;align-items:flex-start;justify-content:space-between;gap:8px}
.name{margin:0;font-size:15px;font-weight:600;word-break:break-word}
.path{margin:2px 0 8px;color:var(--muted);font:12px/1.35 ui-monospace,Menlo,Consolas,monospace;
word-break:break-all}
.why{margin:8px 0;padding:8px 10px;border-radius:6px;font-size:13px;word-break:break-word}
.failed .why{background:var(--failed-bg);color:#7f1d1d}
.skipped .why,.pending .why{background:var(--skipped-bg);color:#374151}
.why code{font-weight:700;margin-right:4px}
dl{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:8px 12px;margin:10px 0 0}
dl div.wide{grid-column:1/-1}
dt{color:var(--muted);font-size:11px;text-transform:uppercase;letter-spacing:.04em}
dd{margin:0;font-size:13px;font-variant-numeric:tabular-nums;word-break:break-word}
dd a{color:#1a5fb4}
footer{color:var(--muted);font-size:12px;padding:0 28px 24px}
"""


def write_index(
    out_root: str | os.PathLike, report: Mapping[str, Any], *, now: datetime | None = None
) -> Path:
    """Write ``OUT/index.html`` for a run report, atomically.

    Parameters
    ----------
    out_root
        The output root; the page goes there and file paths in the report (``preview``,
        ``geojson``...) are linked relative to it.
    report
        ``RunReport.to_dict()``; missing optional fields are shown as "—", unknown ones
        are ignored. A per-input ``preview`` (a path relative to ``out_root``) is shown.
    now
        Time of writing shown on the page (default: now, local time).

    Returns
    -------
    pathlib.Path
        The page's path.

    Raises
    ------
    OutputError
        When the page cannot be written.
    """
    out_root = Path(out_root)
    text = render_index(report, out_root=out_root, now=now)
    return write_output(out_root / INDEX_NAME, text.encode("utf-8"), "run page")


def render_index(
    report: Mapping[str, Any],
    *,
    out_root: str | os.PathLike | None = None,
    now: datetime | None = None,
) -> str:
    """The page's HTML text (see :func:`write_index`)."""
    now = now or datetime.now().astimezone()
    root = Path(out_root) if out_root is not None else None
    inputs = [i for i in (report.get("inputs") or []) if isinstance(i, Mapping)]
    title = f"pipeline run · {root.name}" if root is not None else "pipeline run"
    cards = "\n".join(_card(i, n, root) for n, i in enumerate(inputs))
    if not cards:
        cards = '<p class="empty">This run has no inputs.</p>'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{_header(report, inputs, title, now)}\n<main>\n{_details(report)}"
        f'<section class="grid" aria-label="inputs">\n{cards}\n</section>\n</main>\n'
        f"<footer>Written by pipeline {_esc(report.get('version', '?'))} at "
        f"{_esc(now.isoformat(timespec='seconds'))}. Previews: the input with its "
        "segmentation in class colours.</footer>\n</body>\n</html>\n"
    )


def _header(report: Mapping[str, Any], inputs: list, title: str, now: datetime) -> str:
    counts = report.get("counts")
    if not isinstance(counts, Mapping):  # count them here when the report does not
        counts = {}
        for i in inputs:
            counts[str(i.get("state"))] = counts.get(str(i.get("state")), 0) + 1
    states = [s for s in _STATES if s in counts] + [s for s in counts if s not in _STATES]
    states = [s for s in states if counts[s] or s in ("done", "failed", "skipped")]
    chips = "".join(
        f'<span class="chip {_state_class(s)}{" zero" if not counts[s] else ""}" '
        f'data-state="{_esc(s)}">{_esc(counts[s])} {_esc(s)}</span>'
        for s in states
    )
    ok = report.get("ok")
    verdict = (
        ""
        if ok is None
        else f'<span class="verdict {"ok" if ok else "bad"}">'
        f"{'all inputs done or skipped' if ok else 'some inputs failed'}</span>"
    )
    model = report.get("model") if isinstance(report.get("model"), Mapping) else {}
    model_text = os.path.basename(str(model.get("path") or "")) or "—"
    if model.get("sha256"):
        model_text += f" ({str(model['sha256'])[:12]})"
    sub = [
        verdict,
        f"<span>{len(inputs)} inputs</span>",
        f"<span>{_seconds(report.get('seconds'))}</span>",
        f"<span>{_mpix(report.get('pixels'))} at {_speed(report.get('mpix_per_s'))}</span>",
        f"<span>model {_esc(model_text)}</span>",
        f"<span>pipeline {_esc(report.get('version', '?'))}</span>",
        f'<span>written <time datetime="{_esc(now.isoformat())}">'
        f"{_esc(now.strftime('%Y-%m-%d %H:%M:%S %Z').strip())}</time></span>",
    ]
    return (
        f'<header>\n<h1>{_esc(title)}</h1>\n<div class="sub">{"".join(s for s in sub if s)}'
        f'</div>\n<div class="totals">{chips}</div>\n</header>'
    )


def _details(report: Mapping[str, Any]) -> str:
    parts = []
    for key, label in (("model", "Model"), ("config", "Configuration")):
        value = report.get(key)
        if isinstance(value, Mapping) and value:
            rows = "".join(
                f"<tr><td>{_esc(k)}</td><td>{_esc(_plain(v))}</td></tr>" for k, v in value.items()
            )
            parts.append(
                f'<details class="meta"><summary>{label}</summary><table>{rows}</table></details>\n'
            )
    return f'<div class="metas">{"".join(parts)}</div>\n' if parts else ""


def _card(item: Mapping[str, Any], n: int, root: Path | None) -> str:
    state = str(item.get("state") or "pending")
    name = str(item.get("name") or os.path.basename(str(item.get("path") or "")) or f"input {n}")
    why = ""
    if state != "done" and (item.get("reason") or item.get("message")):
        reason = f"<code>{_esc(item.get('reason'))}</code> " if item.get("reason") else ""
        message = _esc(item.get("message") or "")
        why = f'<div class="why">{reason}<span class="message">{message}</span></div>\n'
    stats = [
        ("time", _seconds(item.get("seconds"))),
        ("speed", _speed(_rate(item.get("pixels"), item.get("seconds")))),
        ("pixels", _mpix(item.get("pixels"))),
        ("tissue", _percent(item.get("tissue_fraction"))),
        ("tiles", _tiles(item)),
        ("blocks", _esc(item.get("blocks")) if item.get("blocks") else "—"),
        ("shape", _esc(" × ".join(map(str, item["shape"]))) if item.get("shape") else "—"),
    ]
    if state != "done":  # a failed or skipped input has no figures worth a row of dashes
        stats = [(k, v) for k, v in stats if v != "—"]
    wide = []
    if item.get("output"):
        wide.append(("output", _esc(_shown(str(item["output"]), root))))
    for key, label in _FILE_FIELDS:
        if isinstance(item.get(key), str) and item.get(key):
            shown = _esc(_shown(item[key], root))
            wide.append((label, f'<a href="{_href(item[key], root)}">{shown}</a>'))
    cells = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in stats)
    cells += "".join(f'<div class="wide"><dt>{k}</dt><dd>{v}</dd></div>' for k, v in wide)
    return (
        f'<article class="card {_state_class(state)}" id="input-{n}" data-state="{_esc(state)}">\n'
        f"{_thumb(item, state, name, root)}\n"
        f'<div class="body"><div class="title"><h2 class="name">{_esc(name)}</h2>'
        f'<span class="chip {_state_class(state)} state">{_esc(state)}</span></div>\n'
        f'<div class="path">{_esc(item.get("path") or "")}</div>\n{why}'
        f"{f'<dl>{cells}</dl>' if cells else ''}</div>\n</article>"
    )


def _thumb(item: Mapping[str, Any], state: str, name: str, root: Path | None) -> str:
    preview = item.get("preview")
    if not isinstance(preview, str) or not preview:
        text = {"done": "no preview", "failed": "failed: no output"}.get(state, state)
        return f'<div class="thumb none">{_esc(text)}</div>'
    href = _href(preview, root)
    return (
        f'<a class="thumb" href="{href}" title="open the full preview">'
        f'<img src="{href}" alt="preview of {_esc(name)}" '
        f'onload="{_ONLOAD}" onerror="{_ONERROR}"></a>'
    )


def _relative(path: str, root: Path | None) -> str | None:
    """``path`` relative to the output root in URL form, or None when it lies outside."""
    if not os.path.isabs(path):
        return path.replace(os.sep, "/")
    if root is not None:
        rel = os.path.relpath(path, root)
        if rel != ".." and not rel.startswith(".." + os.sep):
            return rel.replace(os.sep, "/")
    return None


def _shown(path: str, root: Path | None) -> str:
    return _relative(path, root) or path


def _href(path: str, root: Path | None) -> str:
    """A URL for ``path`` (relative to the output root when inside it), attribute-escaped."""
    rel = _relative(path, root)
    return _esc(quote(rel) if rel is not None else Path(path).as_uri())


def _tiles(item: Mapping[str, Any]) -> str:
    tiles, skipped = item.get("tiles"), item.get("skipped_tiles")
    skipped = int(skipped) if isinstance(skipped, (int, float)) else 0
    if not isinstance(tiles, (int, float)) or not (tiles or skipped):
        return "—"
    return f"{int(tiles):,}" + (f" (+{skipped:,} empty, skipped)" if skipped else "")


def _rate(pixels: Any, seconds: Any) -> float | None:
    if isinstance(pixels, (int, float)) and isinstance(seconds, (int, float)) and seconds > 0:
        return pixels / 1e6 / seconds
    return None


def _seconds(value: Any) -> str:
    if not isinstance(value, (int, float)) or value <= 0:
        return "—"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _mpix(value: Any) -> str:
    return f"{value / 1e6:,.1f} Mpx" if isinstance(value, (int, float)) and value > 0 else "—"


def _speed(value: Any) -> str:
    return f"{value:.2f} Mpx/s" if isinstance(value, (int, float)) and value > 0 else "—"


def _percent(value: Any) -> str:
    return f"{100 * value:.0f} %" if isinstance(value, (int, float)) else "—"


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "—" if value is None else str(value)


def _state_class(state: str) -> str:
    return state if state in _STATES else "other"


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)
