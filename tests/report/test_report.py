"""Contact sheet (PNG grid) and HTML page of a run."""

from __future__ import annotations

import html.parser

import numpy as np
import pytest
from PIL import Image

from pnp_batch.report.sheet import (
    BACKGROUND,
    FAILED_FILL,
    PAD,
    SheetEntry,
    build_contact_sheet,
    build_html,
)

THUMB = 64
SETTINGS = "pipeline=tiny model=tiny steps=50 guidance=7.5 pnp_f_t=0.8 pnp_attn_t=0.5"


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", size, color).convert(mode)


def bbox_of(sheet: Image.Image, color: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
    """Bounding box (PIL convention) of the pixels of exactly `color`, or None."""
    ys, xs = np.nonzero(np.all(np.asarray(sheet) == np.array(color, dtype=np.uint8), axis=-1))
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def colors(n: int) -> list[tuple[int, int, int]]:
    """n distinct saturated colours, none equal to the background, the grey or black text."""
    return [(40 + 17 * i % 200, 200 - 13 * i % 150, 60 + 29 * i % 190) for i in range(n)]


def test_grid_has_one_row_per_source_and_one_column_per_target() -> None:
    palette = iter(colors(12))
    layout = [3, 1, 0, 2]  # results per source
    entries, expected = [], []
    for r, n in enumerate(layout):
        src_c = next(palette)
        res = [(solid(next(palette)), f"target {r}.{k}") for k in range(n)]
        entries.append(SheetEntry(solid(src_c), f"source {r}", res))
        expected.append([src_c] + [img.getpixel((0, 0)) for img, _ in res])

    sheet = build_contact_sheet(entries, "demo", SETTINGS, thumb=THUMB)
    n_cols = 1 + max(layout)
    assert sheet.mode == "RGB"
    assert sheet.width == PAD + n_cols * (THUMB + PAD)

    row_tops = []
    for r, row in enumerate(expected):
        boxes = [bbox_of(sheet, c) for c in row]
        assert all(b is not None for b in boxes), (r, boxes)
        lefts = [b[0] for b in boxes]
        # Columns sit on a fixed pitch; each tile is a 40x30 source scaled to fit THUMB wide.
        for col, left in enumerate(lefts):
            assert left == PAD + col * (THUMB + PAD)
            assert boxes[col][2] - boxes[col][0] == THUMB
        assert len({b[1] for b in boxes}) == 1, "tiles of one row share their top"
        row_tops.append(boxes[0][1])
    assert row_tops == sorted(row_tops) and len(set(row_tops)) == len(row_tops)
    assert sheet.height > row_tops[-1] + THUMB // 2


def test_thumbnails_keep_aspect_and_fit() -> None:
    tall, wide = (10, 200, 10), (200, 10, 10)
    entry = SheetEntry(solid(tall, (100, 400)), "tall", [(solid(wide, (900, 300)), "wide")])
    sheet = build_contact_sheet([entry], "t", SETTINGS, thumb=THUMB)
    x0, y0, x1, y1 = bbox_of(sheet, tall)
    assert (y1 - y0, x1 - x0) == (THUMB, THUMB // 4)
    x0, y0, x1, y1 = bbox_of(sheet, wide)
    assert (x1 - x0) == THUMB and abs((y1 - y0) - THUMB / 3) <= 1


def test_modes_other_than_rgb_are_accepted() -> None:
    entry = SheetEntry(
        solid((90, 90, 90), mode="L"),
        "grey",
        [(solid((0, 120, 0), mode="RGBA"), "rgba"), (solid((0, 0, 200), mode="P"), "palette")],
    )
    sheet = build_contact_sheet([entry], "t", SETTINGS, thumb=THUMB)
    assert sheet.mode == "RGB"
    assert bbox_of(sheet, (0, 120, 0)) is not None


def caption_area(sheet: Image.Image, tile_box: tuple[int, int, int, int]) -> Image.Image:
    """The strip under a full-height tile where its caption is drawn."""
    x0, _, _, y1 = tile_box
    return sheet.crop((x0, y1, x0 + THUMB, min(sheet.height, y1 + 40)))


def count_not(img: Image.Image, color: tuple[int, int, int]) -> int:
    """How many pixels of `img` differ from `color`."""
    return int(np.any(np.asarray(img) != np.array(color, dtype=np.uint8), axis=-1).sum())


def non_background(img: Image.Image) -> int:
    return count_not(img, BACKGROUND)


def test_captions_are_drawn_under_tiles() -> None:
    src, res = (200, 30, 30), (30, 30, 200)
    square = (50, 50)
    with_text = build_contact_sheet(
        [SheetEntry(solid(src, square), "a photo of a cat", [(solid(res, square), "a photo of a fox")])],
        "t",
        SETTINGS,
        thumb=THUMB,
    )
    blank = build_contact_sheet(
        [SheetEntry(solid(src, square), "", [(solid(res, square), "")])], "t", SETTINGS, thumb=THUMB
    )
    for color in (src, res):
        assert non_background(caption_area(with_text, bbox_of(with_text, color))) > 20
        assert non_background(caption_area(blank, bbox_of(blank, color))) == 0


def test_long_captions_wrap_within_their_column() -> None:
    long = "a watercolor painting of a very fluffy orange cat sitting on a windowsill " * 3
    src = (200, 30, 30)
    sheet = build_contact_sheet([SheetEntry(solid(src, (50, 50)), long, [])], "t", SETTINGS, thumb=THUMB)
    assert sheet.width == PAD + THUMB + PAD
    x0, _, _, y1 = bbox_of(sheet, src)
    below = sheet.crop((0, y1, sheet.width, sheet.height))
    # Several caption lines, all inside the tile's column (nothing drawn in the right margin).
    assert below.getbbox() is not None
    assert non_background(below.crop((x0 + THUMB + 1, 0, below.width, below.height))) == 0
    inked_rows = [y for y in range(below.height) if non_background(below.crop((0, y, below.width, y + 1)))]
    assert inked_rows and inked_rows[-1] - inked_rows[0] > 30


def test_failed_result_is_a_grey_tile_with_the_word_failed() -> None:
    src = (200, 30, 30)
    entry = SheetEntry(
        solid(src, (50, 50)), "source", [(None, "a photo of a fox: failed: CUDA out of memory")]
    )
    sheet = build_contact_sheet([entry], "t", SETTINGS, thumb=THUMB)
    box = bbox_of(sheet, FAILED_FILL)
    assert box is not None
    x0, y0, x1, y1 = box
    assert x0 == PAD + THUMB + PAD and x1 - x0 == THUMB and y1 - y0 == THUMB
    tile = sheet.crop(box)
    assert count_not(tile, FAILED_FILL) > 20, "the word 'failed' is drawn"
    assert non_background(caption_area(sheet, box)) > 20, "the error is in the caption"


def test_header_shows_title_and_settings() -> None:
    entry = SheetEntry(solid((200, 30, 30), (50, 50)), "s", [])
    plain = build_contact_sheet([entry], "", "", thumb=THUMB)
    titled = build_contact_sheet([entry], "run 2024-06-01", SETTINGS, thumb=THUMB)
    assert titled.height > plain.height
    top = titled.crop((0, 0, titled.width, bbox_of(titled, (200, 30, 30))[1]))
    assert non_background(top) > 50


def test_empty_and_wide_sheets() -> None:
    empty = build_contact_sheet([], "nothing yet", SETTINGS, thumb=THUMB)
    assert empty.width == PAD + THUMB + PAD and empty.height > 0
    many = SheetEntry(solid((1, 2, 3)), "s", [(solid((9, 9, 9)), f"p{i}") for i in range(20)])
    wide = build_contact_sheet([many], "t", SETTINGS, thumb=32)
    assert wide.width == PAD + 21 * (32 + PAD)


def test_too_small_thumb_is_an_error() -> None:
    with pytest.raises(ValueError):
        build_contact_sheet([], "t", SETTINGS, thumb=4)


class _Collector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def sample_entries() -> list[tuple[str, str, list[tuple[str | None, str, str]]]]:
    return [
        (
            "sources/chelsea.jpg",
            "a photo of a cat",
            [
                ("images/chelsea-fox.png", "a photo of a fox", "ok"),
                (
                    None,
                    "a watercolor painting <script>alert(1)</script>",
                    "failed: CUDA out of memory & more",
                ),
            ],
        ),
        ("sources/coffee.jpg", 'coffee "mug"', []),
    ]


def test_html_is_self_contained_and_escapes_labels() -> None:
    page = build_html(
        sample_entries(), "Run <b>1</b>", {"pipeline": "sd21-base", "pnp_f_t": 0.8, "note": "<i>x</i>"}
    )
    assert page.startswith("<!DOCTYPE html>")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>1</b>" not in page and "<i>x</i>" not in page
    assert "CUDA out of memory &amp; more" in page
    assert "<link" not in page and "http://" not in page and "https://" not in page

    parser = _Collector()
    parser.feed(page)
    imgs = [a["src"] for t, a in parser.tags if t == "img"]
    assert imgs == ["sources/chelsea.jpg", "images/chelsea-fox.png", "sources/coffee.jpg"]
    text = "".join(parser.text)
    assert "a watercolor painting <script>alert(1)</script>" in text  # shown literally
    assert 'coffee "mug"' in text


def test_html_settings_table_and_failed_cells() -> None:
    page = build_html(sample_entries(), "run", {"pipeline": "sd21-base", "steps": 50, "pnp_attn_t": 0.5})
    parser = _Collector()
    parser.feed(page)
    text = "".join(parser.text)
    for s in ("pipeline", "sd21-base", "steps", "50", "pnp_attn_t", "0.5"):
        assert s in text
    classes = [a.get("class") for t, a in parser.tags if t == "figure"]
    assert classes == ["source", "result", "result failed", "source"]
    assert page.count('class="failed-tile"') == 1


def test_html_neutralises_script_links() -> None:
    page = build_html([("javascript:alert(1)", "s", [("JavaScript:x", "p", "ok")])], "t", {})
    assert "javascript:" not in page.lower()
