"""An output that refuses writes (full, over quota, read-only, denied, no such bucket) stops the run
cleanly: checked before any model loads (exit 2), and mid-run the rows stay pending, none is recorded
failed for it, the summary says why, and a re-run after the condition clears equals an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pnp_batch.cli import main
from pnp_batch.errors import StoreRefused
from pnp_batch.io import refusal, retry, storage
from pnp_batch.io.results import latest_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "manifests" / "demo" / "manifest.csv"
FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report"]


class _Boto(Exception):
    def __init__(self, code: str) -> None:
        self.response = {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": 403}}
        super().__init__(f"An error occurred ({code}) when calling the PutObject operation")


@pytest.mark.parametrize("exc,kind", [
    (OSError(errno.ENOSPC, "No space left on device"), "store_full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "store_full"),
    (OSError(errno.EROFS, "Read-only file system"), "store_refused"),
    (PermissionError(errno.EACCES, "Permission denied"), "store_refused"),
    (OSError(errno.EPERM, "Operation not permitted"), "store_refused"),
    (_Boto("AccessDenied"), "store_refused"),
    (_Boto("NoSuchBucket"), "store_refused"),
    (_Boto("InvalidBucketName"), "store_refused"),
    (_Boto("QuotaExceeded"), "store_full"),
    (OSError(errno.EIO, "s3://b/k: An error occurred (AccessDenied) when calling the PutObject operation"),
     "store_refused"),
    (OSError("write failed: [Errno 28] No space left on device"), "store_full"),
])
def test_write_refusals_are_the_stores_condition(exc, kind):
    assert refusal.classify(exc)[0] == kind
    r = refusal.refused(exc, "/out/images/a.png")
    assert isinstance(r, StoreRefused) and r.kind == kind and "re-run the same command" in str(r)


@pytest.mark.parametrize("exc", [ConnectionResetError(), FileNotFoundError("x"), ValueError("bad"),
                                 OSError(errno.EIO, "I/O error"), _Boto("SlowDown")])
def test_other_errors_are_not_refusals(exc):
    assert refusal.classify(exc) is None


def test_a_full_store_is_waited_for_up_to_the_outage_limit_and_a_read_only_one_is_not(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(retry, "_sleep", slept.append)
    retry.set_outage_timeout(60)
    try:
        tries = iter([OSError(errno.ENOSPC, "full"), OSError(errno.ENOSPC, "full"), None])

        def write() -> str:
            e = next(tries)
            if e is not None:
                raise e
            return "written"

        assert refusal.write_or_refuse(write, "/out/x") == "written" and len(slept) == 2
        with pytest.raises(StoreRefused) as e:
            refusal.write_or_refuse(lambda: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")), "/out/x")
        assert e.value.kind == "store_refused" and len(slept) == 2  # no wait for a read-only store
        with pytest.raises(StoreRefused):
            refusal.write_or_refuse(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")), "/out/x", wait=False)
        assert len(slept) == 2
    finally:
        retry.set_outage_timeout(None)


def _faulty_writes(monkeypatch, where: str, nth: int, err: int) -> dict:
    """Every write whose URI contains `where` fails with `err` from the `nth` on; counts the writes."""
    state = {"seen": 0, "after": 0, "on": True}
    real = storage._write_bytes

    def write(uri: str, data: bytes) -> None:
        if where in uri and state["on"]:
            state["seen"] += 1
            if state["seen"] >= nth:
                state["after"] += 1
                raise OSError(err, os.strerror(err), uri)
        real(uri, data)

    monkeypatch.setattr(storage, "_write_bytes", write)
    return state


def _summary(out: Path) -> dict:
    return json.loads(max((out / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime_ns).read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["run", str(DEMO), "--out", str(out), *FAST]) == 0
    return out


@pytest.mark.parametrize("err,status", [(errno.ENOSPC, "store_full"), (errno.EDQUOT, "store_full"),
                                        (errno.EROFS, "store_refused"), (errno.EACCES, "store_refused")])
def test_a_refused_image_write_stops_the_run_with_rows_pending(tmp_path, monkeypatch, reference, err, status, caplog):
    out = tmp_path / "out"
    state = _faulty_writes(monkeypatch, "/images/", 4, err)
    assert main(["run", str(DEMO), "--out", str(out), *FAST, "--outage-timeout", "0"]) == 1
    recs = latest_results(str(out)).to_pylist()
    assert recs and all(r["status"] == "ok" for r in recs)  # nothing recorded failed for the store's reason
    assert len(recs) == 3
    s = _summary(out)
    assert s["status"] == status
    assert s["counts"]["failed"] == 0 and s["counts"]["left_pending"] == 12 - 3
    # at most one group in flight besides the refused one was still translated (the demo's groups hold <= 3 rows)
    assert state["after"] <= 1 + 3
    assert not (out / "_lease.json").exists()  # released
    assert "re-run the same command" in caplog.text and "Traceback" not in caplog.text

    state["on"] = False  # the condition clears
    assert main(["run", str(DEMO), "--out", str(out), *FAST]) == 0
    for img in (reference / "images").iterdir():
        assert (out / "images" / img.name).read_bytes() == img.read_bytes(), img.name


def test_a_refused_results_shard_leaves_its_rows_pending(tmp_path, monkeypatch, reference):
    out = tmp_path / "out"
    _faulty_writes(monkeypatch, "/results/", 1, errno.EROFS)
    assert main(["run", str(DEMO), "--out", str(out), *FAST, "--outage-timeout", "0"]) == 1
    assert not list((out / "results").glob("*.parquet"))
    assert _summary(out)["status"] == "store_refused"
    monkeypatch.undo()
    assert main(["run", str(DEMO), "--out", str(out), *FAST]) == 0
    assert len(latest_results(str(out))) == 12


def test_a_refused_feature_write_only_warns(tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    _faulty_writes(monkeypatch, "/features/", 1, errno.ENOSPC)
    assert main(["run", str(DEMO), "--out", str(out), *FAST, "--limit", "3"]) == 0
    assert "could not store" in caplog.text.lower() or "feature" in caplog.text.lower()
    assert all(r["status"] == "ok" for r in latest_results(str(out)).to_pylist())


def test_an_output_that_takes_no_write_stops_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from pnp_batch.translate import translator

    monkeypatch.setattr(translator, "load_models", lambda *a, **k: pytest.fail("a model was loaded"))
    _faulty_writes(monkeypatch, str(tmp_path / "ro"), 1, errno.EROFS)
    assert main(["run", str(DEMO), "--out", str(tmp_path / "ro" / "out"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "cannot take writes: read-only file system" in err and str(tmp_path / "ro" / "out") in err
    assert "Traceback" not in err
    assert main(["run", str(DEMO), "--out", str(tmp_path / "ok"), *FAST, "--features",
                 str(tmp_path / "ro" / "features")]) == 2
    assert "the feature store (--features)" in capsys.readouterr().err


def test_eval_checks_its_output_before_loading_metric_models(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["run", str(DEMO), "--out", str(out), *FAST, "--limit", "1"]) == 0
    from pnp_batch.eval import score

    monkeypatch.setattr(score, "load_scorer", lambda *a, **k: pytest.fail("metric models were loaded"))
    _faulty_writes(monkeypatch, "/eval/", 1, errno.EACCES)
    assert main(["eval", str(out), "--set", "eval_clip_model=tiny-clip", "--set", "eval_dino_model=tiny-dino"]) == 2
    assert "OUT/eval" in capsys.readouterr().err


def test_an_output_bucket_that_does_not_exist_is_refused_up_front(s3_server, capsys):
    assert main(["run", str(DEMO), "--out", "s3://no-such-bucket-pnp/out", *FAST]) == 2
    assert "the bucket does not exist" in capsys.readouterr().err


def _mount_tmpfs(path: Path, size: str, *opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(path)],
                       capture_output=True, check=False)
    return r.returncode == 0


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_real_file_system_that_fills_up(tmp_path, engine):
    """A real 600 KB file system (tmpfs; root only): the run stops at the first refused write, then
    space is freed (the mount grows) and the same command finishes, byte-equal to an uninterrupted run."""
    if engine == "ray":
        pytest.importorskip("ray")
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "600k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = small / "out"
        cmd = [sys.executable, "-m", "pnp_batch", "run", str(DEMO), "--out", str(out), *FAST, "--set",
               "resolution=192", "--features", str(tmp_path / "features"), "--outage-timeout", "0",
               "--engine", engine, *(["--workers", "1"] if engine == "ray" else [])]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert first.returncode == 1, first.stderr[-3000:]
        assert "is full" in first.stderr and "Traceback" not in first.stderr
        s = _summary(out)
        assert s["status"] == "store_full" and s["counts"]["failed"] == 0 and s["counts"]["left_pending"] > 0
        assert subprocess.run(["mount", "-o", "remount,size=50m", str(small)], check=False).returncode == 0
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert second.returncode == 0, second.stderr[-3000:]
        ref = tmp_path / "ref"  # the same command, uninterrupted, on an ordinary disk (same engine, same threads)
        cmd[cmd.index("--out") + 1] = str(ref)
        cmd[cmd.index("--features") + 1] = str(tmp_path / "ref-features")
        assert subprocess.run(cmd, capture_output=True, timeout=600, check=False).returncode == 0
        for img in (ref / "images").iterdir():
            assert (out / "images" / img.name).read_bytes() == img.read_bytes(), img.name
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_real_read_only_mount_exits_2(tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "1m", "ro"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        r = subprocess.run([sys.executable, "-m", "pnp_batch", "run", str(DEMO), "--out", str(ro / "out"), *FAST],
                           capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 2 and "read-only file system" in r.stderr and "Traceback" not in r.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
