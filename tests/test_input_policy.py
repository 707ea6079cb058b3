"""The input policy through whole runs (local and Ray engines), `validate` and `eval`: refused rows fail
with their rule and no request reaches the loopback server; the matching option lets them through; no
credential from a URI reaches a log line, record, summary or report."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.io.results import latest_results

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64"]
SECRET = "Sup3rSecretPw"


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _Images:
    """A server on 127.0.0.1 that counts the requests it gets."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.paths.append(self.path)
                body = _png(3)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def images() -> Iterator[_Images]:
    s = _Images()
    yield s
    s.httpd.shutdown()


def _manifest(tmp_path: Path, server: _Images) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "ok.png").write_bytes(_png(1))
    (tmp_path / "outside.png").write_bytes(_png(2))
    host = server.base.split("//")[1]
    rows = [
        ("ok", "ok.png"),
        ("loop", f"{server.base}/loop.png"),
        ("cred", f"http://alice:{SECRET}@{host}/cred.png"),
        ("etc", "file:///etc/passwd"),
        ("abs", str(tmp_path / "outside.png")),
        ("up", "../outside.png"),
    ]
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "source_prompt", "target_prompt"])
        for rid, image in rows:
            w.writerow([rid, image, "a photo", "a painting"])
    return folder / "manifest.csv"


def _records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in latest_results(str(out)).to_pylist()}


def _no_secret_anywhere(out: Path, log: str) -> None:
    assert SECRET not in log
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".html", ".parquet"):
            assert SECRET.encode() not in p.read_bytes(), p


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_refused_rows_fail_with_their_rule_and_nothing_is_requested(tmp_path, images, capfd, engine):
    if engine == "ray":
        pytest.importorskip("ray")
    manifest = _manifest(tmp_path, images)
    out = tmp_path / "out"
    extra = ["--engine", "ray", "--workers", "1"] if engine == "ray" else []
    assert main(["run", str(manifest), "--out", str(out), *FAST, *extra]) == 1
    recs = _records(out)
    assert recs["ok"]["status"] == "ok"
    assert images.paths == []  # the loopback server never heard of this run
    want = {"loop": "loopback address 127.0.0.1", "cred": "loopback address 127.0.0.1",
            "etc": "local file file:///etc/passwd is outside the manifest's folder",
            "abs": "is outside the manifest's folder", "up": "is outside the manifest's folder"}
    for rid, reason in want.items():
        assert recs[rid]["status"] == "failed"
        assert recs[rid]["error"].startswith("uri not allowed: "), recs[rid]["error"]
        assert reason in recs[rid]["error"]
    assert recs["cred"]["image"] == f"http://***@{images.base.split('//')[1]}/cred.png"
    summary = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert summary["input_policy"]["http"] == "public addresses only"
    assert summary["input_policy"]["local_files"].startswith("under ")
    _no_secret_anywhere(out, "".join(capfd.readouterr()))


def test_the_matching_options_let_the_same_rows_through(tmp_path, images, capfd):
    manifest = _manifest(tmp_path, images)
    out = tmp_path / "out"
    code = main(["run", str(manifest), "--out", str(out), *FAST, "--allow-uri", f"{images.base}/",
                 "--allow-uri", str(tmp_path) + "/", "--allow-uri", "/etc/passwd"])
    assert code == 1  # /etc/passwd is read now, and is not an image
    recs = _records(out)
    assert {k for k, r in recs.items() if r["status"] == "ok"} == {"ok", "loop", "cred", "abs", "up"}
    assert "not an image" in recs["etc"]["error"]
    # each once for the translation; the contact sheet reads sources again under the same policy, but
    # not from the record's redacted URI (it would send '***' as the password)
    assert sorted(images.paths) == ["/cred.png", "/loop.png", "/loop.png"]
    _no_secret_anywhere(out, "".join(capfd.readouterr()))

    out2 = tmp_path / "out2"
    assert main(["run", str(manifest), "--out", str(out2), *FAST, "--set", "allow_private_network=true",
                 "--limit", "3"]) == 0
    assert sorted(images.paths) == ["/cred.png", "/cred.png"] + ["/loop.png"] * 4


def test_validate_reports_the_same_without_reading_anything(tmp_path, images, capsys):
    manifest = _manifest(tmp_path, images)
    assert main(["validate", str(manifest), "--check-images"]) == 2
    text = capsys.readouterr().out
    for rid in ("loop", "cred", "etc", "abs", "up"):
        assert f"(id {rid}): uri not allowed: " in text
    assert images.paths == [] and SECRET not in text
    assert main(["validate", str(manifest), "--allow-private-network", "--allow-uri", str(tmp_path) + "/",
                 "--allow-uri", "/etc/"]) == 0


def test_eval_reads_sources_under_the_runs_policy(tmp_path, images):
    manifest = _manifest(tmp_path, images)
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), *FAST, "--allow-uri", f"{images.base}/",
                 "--set", "eval_clip_model=tiny-clip", "--set", "eval_dino_model=tiny-dino"]) == 1
    served = len(images.paths)
    assert main(["eval", str(out)]) == 1  # the run's policy allowed the server: `loop` is scored; `cred` is redacted
    from pnp_batch.io.metrics import read_scores

    scores = {r["id"]: r for r in read_scores(str(out)).to_pylist()}
    assert scores["ok"]["status"] == "ok" and scores["loop"]["status"] == "ok"
    assert "redacted" in scores["cred"]["error"]
    assert len(images.paths) == served + 1  # /loop.png once more, nothing for the redacted URI
