"""Scores under each output on the contact sheet (run --eval)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pnp_batch.report.sheet import SheetEntry, build_contact_sheet, build_html
from pnp_batch.report.write import score_line


def test_score_line_says_clip_its_gain_and_structure():
    ok = {"status": "ok", "clip_score": 27.34, "clip_score_source": 21.0, "structure_dist": 0.04123}
    assert score_line(ok) == "CLIP 27.3 (+6.3 vs source) structure 0.0412"
    assert score_line({**ok, "clip_score_source": None, "structure_dist": None}) == "CLIP 27.3"
    assert score_line({"status": "failed", "error": "output image unreadable"}) == \
        "not scored: output image unreadable"
    assert score_line(None) is None


def test_notes_are_drawn_under_the_caption():
    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    plain = build_contact_sheet([SheetEntry(img, "src", [(img, "a fox")])], "t", "s", thumb=64)
    noted = build_contact_sheet([SheetEntry(img, "src", [(img, "a fox")], notes=["CLIP 27.3 structure 0.0412"])],
                                "t", "s", thumb=64)
    assert noted.height > plain.height  # room for the scores line
    tail = np.asarray(noted)[plain.height - 12 :]  # the extra strip holds drawn (non-white) text
    assert (tail < 200).any()
    html = build_html([("s.jpg", "src", [("o.png", "a fox", "ok · CLIP 27.3")])], "t", {})
    assert 'class="result"' in html and "CLIP 27.3" in html  # still shown as ok, not failed
