"""`pnp-batch report --sort/--worst/--best/--sample` and the browsable OUT/report/index.html on a large output:
10,000 rows written through the project's own writers (results, scores, a run summary), the chosen rows checked
against the same order computed here, and the page opened in a real headless Chromium (Selenium): it loads
every row, sorts by a metric, filters by status and pages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.io.metrics import ScoreWriter
from pnp_batch.io.results import ResultWriter

N_ROWS = 10_000
N_SOURCES = 20


@pytest.fixture(scope="module")
def big_out(tmp_path_factory) -> Path:
    """An output of N_ROWS rows over N_SOURCES sources, 3% failed, two settings, every ok row scored."""
    root = tmp_path_factory.mktemp("browse")
    src_dir = root / "in"
    src_dir.mkdir()
    out = root / "out"
    (out / "images").mkdir(parents=True)
    (out / "runs").mkdir()
    rng = np.random.default_rng(3)
    for s in range(N_SOURCES):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src_dir / f"s{s}.png")
    (src_dir / "m.parquet").write_bytes(b"")  # the manifest's folder is what the input policy allows
    (out / "runs" / "r1.json").write_text(json.dumps({"run_id": "r1", "manifest": str(src_dir / "m.parquet"),
                                                      "config": {"resolution": 64, "resize_mode": "short_side"}}))
    tile = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    tile.save(out / "images" / "_tile.png")
    data = (out / "images" / "_tile.png").read_bytes()
    dist = rng.random(N_ROWS)
    clip = 20 + 10 * rng.random(N_ROWS)
    failed = set(rng.choice(N_ROWS, size=N_ROWS * 3 // 100, replace=False).tolist())
    with ResultWriter(str(out), "r1", shard_rows=5000) as w, ScoreWriter(str(out), "e1", shard_rows=5000) as sw:
        for i in range(N_ROWS):
            rid = f"row{i:05d}"
            h = "cfgA" if i % 2 else "cfgB"
            rec = {"id": rid, "image": str(src_dir / f"s{i % N_SOURCES}.png"), "source_prompt": "a photo",
                   "target_prompt": f"prompt {i}", "config_hash": h, "setting": "gs5" if i % 2 else "gs7"}
            if i in failed:
                w.add({**rec, "status": "failed", "error": "simulated"})
                continue
            path = out / "images" / f"{rid}.png"
            path.write_bytes(data)
            w.add({**rec, "status": "ok", "output": str(path)})
            sw.add({"id": rid, "config_hash": h, "status": "ok", "clip_score": float(clip[i]),
                    "clip_score_source": 20.0, "structure_dist": float(dist[i])})
    (out / "images" / "_tile.png").unlink()
    (root / "truth.json").write_text(json.dumps({"dist": dist.tolist(), "failed": sorted(failed)}))
    return out


def _truth(out: Path) -> tuple[np.ndarray, set[int]]:
    t = json.loads((out.parent / "truth.json").read_text())
    return np.asarray(t["dist"]), set(t["failed"])


def test_worst_and_best_rows_by_a_metric_and_a_seeded_sample(big_out):
    dist, failed = _truth(big_out)
    ok = [i for i in range(N_ROWS) if i not in failed]
    assert main(["report", str(big_out), "--sort", "structure_dist", "--worst", "48", "--no-index"]) == 0
    worst = json.loads((big_out / "report" / "worst-48-structure_dist.json").read_text())["ids"]
    assert worst == [f"row{i:05d}" for i in sorted(ok, key=lambda i: -dist[i])[:48]]  # highest distance first
    assert Image.open(big_out / "report" / "worst-48-structure_dist.png").size[1] > 200
    assert main(["report", str(big_out), "--sort", "structure_dist", "--best", "5", "--no-index"]) == 0
    best = json.loads((big_out / "report" / "best-5-structure_dist.json").read_text())["ids"]
    assert best == [f"row{i:05d}" for i in sorted(ok, key=lambda i: dist[i])[:5]]
    picks = []
    for _ in range(2):
        assert main(["report", str(big_out), "--sample", "12", "--seed", "4", "--no-index"]) == 0
        picks.append(json.loads((big_out / "report" / "sample-12-id.json").read_text())["ids"])
    assert picks[0] == picks[1] and len(set(picks[0])) == 12
    assert main(["report", str(big_out), "--worst", "3", "--no-index"]) == 2  # --worst needs --sort


def _chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no Chromium with chromedriver on this machine (Debian: apt install chromium chromium-driver)")
    opts = Options()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_browsable_page_in_headless_chromium(big_out):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    dist, failed = _truth(big_out)
    assert main(["report", str(big_out), "--page-size", "100"]) == 0
    page = big_out / "report" / "index.html"
    assert page.exists() and len(list((big_out / "report" / "thumbs").glob("*.jpg"))) == N_ROWS - len(failed) + N_SOURCES
    b = _chromium()
    try:
        b.get(page.as_uri())
        WebDriverWait(b, 120).until(
            lambda d: d.find_element(By.ID, "loaded").get_attribute("data-complete") == "1")
        assert b.find_element(By.ID, "count").text == f"{N_ROWS} rows"
        cards = b.find_elements(By.CSS_SELECTOR, "#grid .card")
        assert [c.get_attribute("data-id") for c in cards] == [f"row{i:05d}" for i in range(100)]
        # sorted by a metric, highest first: the page's first cards are the rows of highest distance
        Select(b.find_element(By.ID, "sort")).select_by_value("structure_dist")
        Select(b.find_element(By.ID, "dir")).select_by_value("desc")
        ok = [i for i in range(N_ROWS) if i not in failed]
        top = [f"row{i:05d}" for i in sorted(ok, key=lambda i: -dist[i])[:100]]
        got = [c.get_attribute("data-id") for c in b.find_elements(By.CSS_SELECTOR, "#grid .card")]
        assert got == top
        # thumbnails of the shown cards load (a real image, not a broken link)
        img = b.find_element(By.CSS_SELECTOR, "#grid .card img")
        WebDriverWait(b, 30).until(lambda d: d.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        # next page: the following 100
        b.find_element(By.ID, "next").click()
        got2 = [c.get_attribute("data-id") for c in b.find_elements(By.CSS_SELECTOR, "#grid .card")]
        assert got2 == [f"row{i:05d}" for i in sorted(ok, key=lambda i: -dist[i])[100:200]]
        assert b.find_element(By.ID, "pageinfo").text.startswith("page 2 of")
        # filtered by status: only the failed rows, with their error
        Select(b.find_element(By.ID, "status")).select_by_value("failed")
        assert b.find_element(By.ID, "count").text == f"{len(failed)} rows (of {N_ROWS})"
        first = b.find_element(By.CSS_SELECTOR, "#grid .card")
        assert "simulated" in first.text
        # filtered by setting
        Select(b.find_element(By.ID, "status")).select_by_value("")
        Select(b.find_element(By.ID, "setting")).select_by_value("gs5")
        assert b.find_element(By.ID, "count").text == f"{N_ROWS // 2} rows (of {N_ROWS})"
    finally:
        b.quit()
