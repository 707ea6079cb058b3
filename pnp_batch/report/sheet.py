"""Contact sheets of a run: one image grid (PNG) and one HTML page.

Pure functions: images and strings in, an image or a string out. Reading results and writing
the sheet are the caller's business (see cli.py / results.py); nothing here touches files.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

logger = logging.getLogger(__name__)

PAD = 12  # px between tiles and around the sheet
CAPTION_GAP = 4  # px between a tile and its caption
MAX_CAPTION_LINES = 5
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)
FAILED_FILL = (158, 158, 158)
FAILED_TEXT = (255, 255, 255)
ERROR_TEXT = (170, 20, 20)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass
class SheetEntry:
    """One row of the sheet: a source image and its results, in target-prompt order.

    Each result is (image, label); image None marks a failed row, whose label should carry the
    prompt and the error. `notes`, when given, holds one line per result (or None) drawn under its
    caption in a muted colour: the row's metric scores (run --eval).
    """

    source: Image.Image
    source_label: str
    results: list[tuple[Image.Image | None, str]] = field(default_factory=list)
    notes: list[str | None] = field(default_factory=list)


def _font(size: int) -> Font:
    """PIL's bundled default font at `size` px (bitmap fallback where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    return int(font.getbbox("Ag|")[3]) + 3


def _text_width(font: Font, text: str) -> float:
    return font.getlength(text)


def _drawable(font: Font, text: str) -> str:
    """`text` as the font can draw it (the bitmap fallback is Latin-1 only)."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; words longer than a line are split; overflow ends in '...'."""
    text = _drawable(font, " ".join(text.split()))
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        # Split a word that alone does not fit.
        while _text_width(font, word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(font, last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _thumbnail(img: Image.Image, thumb: int) -> Image.Image:
    """`img` scaled (up or down) to fit a thumb x thumb box, aspect kept, as RGB."""
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        img = flat
    elif img.mode != "RGB":
        img = img.convert("RGB")
    return ImageOps.contain(img, (thumb, thumb), Image.Resampling.LANCZOS)


def _failed_tile(thumb: int, font: Font) -> Image.Image:
    tile = Image.new("RGB", (thumb, thumb), FAILED_FILL)
    draw = ImageDraw.Draw(tile)
    word = "failed"
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    draw.text(
        ((thumb - (right - left)) / 2 - left, (thumb - (bottom - top)) / 2 - top),
        word,
        font=font,
        fill=FAILED_TEXT,
    )
    return tile


def build_contact_sheet(
    entries: list[SheetEntry], title: str, settings: str, thumb: int = 256
) -> Image.Image:
    """One RGB image: a header (title, settings), then one row per source: source, then its results.

    Every tile fits a `thumb` x `thumb` cell (aspect kept, centred) with its wrapped caption below.
    The sheet is as wide as the longest row; a source with no results is a row of one tile.
    """
    if thumb < 16:
        raise ValueError(f"thumb={thumb} is too small for a readable sheet (minimum 16)")
    caption_font = _font(max(10, min(16, thumb // 16)))
    title_font = _font(max(14, min(28, thumb // 9)))
    settings_font = _font(max(10, min(16, thumb // 16)))
    failed_font = _font(max(12, thumb // 8))
    caption_lh = _line_height(caption_font)

    n_cols = max([1 + len(e.results) for e in entries], default=1)
    width = PAD + n_cols * (thumb + PAD)
    text_width = width - 2 * PAD

    title_lines = _wrap(title, title_font, text_width, 2)
    settings_lines = _wrap(settings, settings_font, text_width, 4)
    header_h = PAD + len(title_lines) * _line_height(title_font) + 4
    header_h += len(settings_lines) * _line_height(settings_font) + PAD

    # Caption lines per row: the tallest caption of that row sets the row's height.
    rows: list[list[tuple[Image.Image | None, list[str], bool, list[str]]]] = []
    for entry in entries:
        cells: list[tuple[Image.Image | None, list[str], bool, list[str]]] = [
            (entry.source, _wrap(entry.source_label, caption_font, thumb, MAX_CAPTION_LINES), False, [])
        ]
        for j, (img, label) in enumerate(entry.results):
            note = entry.notes[j] if j < len(entry.notes) else None
            note_lines = _wrap(note, caption_font, thumb, 2) if note else []
            cells.append((img, _wrap(label, caption_font, thumb, MAX_CAPTION_LINES), img is None, note_lines))
        rows.append(cells)
    row_heights = [thumb + CAPTION_GAP + max(len(c[1]) + len(c[3]) for c in cells) * caption_lh + PAD
                   for cells in rows]

    sheet = Image.new("RGB", (width, header_h + sum(row_heights)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, font=title_font, fill=TEXT)
        y += _line_height(title_font)
    y += 4
    for line in settings_lines:
        draw.text((PAD, y), line, font=settings_font, fill=MUTED)
        y += _line_height(settings_font)
    draw.line([(PAD, header_h - PAD // 2), (width - PAD, header_h - PAD // 2)], fill=(210, 210, 210))

    y = header_h
    for cells, row_h in zip(rows, row_heights):
        for col, (img, lines, failed, note_lines) in enumerate(cells):
            x = PAD + col * (thumb + PAD)
            tile = _failed_tile(thumb, failed_font) if img is None else _thumbnail(img, thumb)
            sheet.paste(tile, (x + (thumb - tile.width) // 2, y + (thumb - tile.height) // 2))
            ty = y + thumb + CAPTION_GAP
            for line in lines:
                draw.text((x, ty), line, font=caption_font, fill=ERROR_TEXT if failed else TEXT)
                ty += caption_lh
            for line in note_lines:
                draw.text((x, ty), line, font=caption_font, fill=MUTED)
                ty += caption_lh
        y += row_h
    return sheet


_UNSAFE_SCHEMES = ("javascript:", "vbscript:", "data:")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 12px}
table.settings{border-collapse:collapse;margin-bottom:20px;font-size:.9em}
table.settings th,table.settings td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.settings th{background:#f4f4f4;font-weight:600}
.row{display:flex;gap:12px;margin-bottom:20px;overflow-x:auto;padding-bottom:6px;border-bottom:1px solid #eee}
figure{margin:0;width:256px;flex:0 0 256px}
figure img{width:256px;height:256px;object-fit:contain;background:#fafafa;display:block}
figure.source figcaption{font-weight:600}
.failed-tile{width:256px;height:256px;background:#9e9e9e;color:#fff;display:flex;
  align-items:center;justify-content:center;font-size:1.6em}
figcaption{font-size:.85em;margin-top:4px;word-wrap:break-word}
.status{display:block;color:#666;font-size:.9em}
figure.failed .status{color:#a31414}
""".strip()


def _href(href: str) -> str:
    """An attribute-safe link; script-bearing schemes become '#'."""
    if href.strip().lower().startswith(_UNSAFE_SCHEMES):
        logger.warning("report: refusing a link with an unsafe scheme")
        return "#"
    return html.escape(href, quote=True)


def build_html(
    entries: list[tuple[str, str, list[tuple[str | None, str, str]]]],
    title: str,
    settings: dict[str, Any],
) -> str:
    """A self-contained HTML page: the settings as a table, then one row per source image.

    Each entry is (source_href, source_label, [(result_href or None, prompt, status or error)]).
    Links are used as given (make them relative to where the page is written); every label is
    HTML-escaped. A result whose href is None, or whose status is not "ok", is shown as failed.
    """
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if settings:
        out.append('<table class="settings">')
        for key, value in settings.items():
            out.append(f"<tr><th>{esc(str(key))}</th><td>{esc(str(value))}</td></tr>")
        out.append("</table>")
    for source_href, source_label, results in entries:
        out.append('<div class="row">')
        out.append(
            f'<figure class="source"><a href="{_href(source_href)}"><img src="{_href(source_href)}" '
            f'alt="{esc(source_label)}" loading="lazy"></a><figcaption>{esc(source_label)}</figcaption></figure>'
        )
        for href, label, status in results:
            failed = href is None or not status.strip().lower().startswith("ok")
            cls = "result failed" if failed else "result"
            if href is None:
                tile = '<div class="failed-tile">failed</div>'
            else:
                tile = (
                    f'<a href="{_href(href)}"><img src="{_href(href)}" alt="{esc(label)}" loading="lazy"></a>'
                )
            out.append(
                f'<figure class="{cls}">{tile}<figcaption>{esc(label)}'
                f'<span class="status">{esc(status)}</span></figcaption></figure>'
            )
        out.append("</div>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
