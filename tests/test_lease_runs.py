"""One writer per output, end to end: overlapping `pnp-batch run` processes on one OUT (a local folder and
S3 through moto's server). The first takes the lease and does the work; one started a second later exits
2 at once, writing nothing, and names the holder; one started with --wait-for-lease waits, then finds
nothing to do. A SIGKILLed run's lease lapses after its TTL and the next run takes it over."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from test_resume import FAST, IDS, START_TIMEOUT, _env, _inputs, _visible

from pnp_batch.io import storage
from pnp_batch.io.lease import read_holder
from pnp_batch.io.results import latest_results, read_results, read_run_summaries


def _cmd(manifest: Path, out: str, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "pnp_batch", "run", str(manifest), "--out", out, *FAST, "--no-report", *extra]


def _run(manifest: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(manifest, out, *extra), check=False, env=_env(), capture_output=True, text=True,
                          timeout=300)


def _popen(manifest: Path, out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(manifest, out, *extra), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(cond, what: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        time.sleep(0.05)


def _held(out: str) -> bool:
    storage.reset_cache()
    return read_holder(out) is not None


def _assert_each_id_ok_once(out: str) -> None:
    latest = latest_results(out).to_pylist()
    assert sorted(r["id"] for r in latest) == IDS and {r["status"] for r in latest} == {"ok"}
    ok = Counter(r["id"] for r in read_results(out).to_pylist() if r["status"] == "ok")
    assert max(ok.values()) == 1, f"rows done twice: {ok}"


@pytest.fixture(params=["local", "s3"])
def out_uri(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/out"


@pytest.mark.slow
def test_overlapping_runs_one_works_one_is_refused_one_waits(tmp_path, out_uri, tiny_model_dir):
    manifest = _inputs(tmp_path / "in")
    first = _popen(manifest, out_uri, "--lease-ttl", "6")
    try:
        _wait_for(lambda: _held(out_uri), "lease", first)
        holder = read_holder(out_uri)
        assert holder.pid == first.pid
        time.sleep(1.0)  # "started a second apart"
        t0 = time.monotonic()
        refused = _run(manifest, out_uri)
        took = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the second asked: the test proves nothing"
        waiter = _popen(manifest, out_uri, "--wait-for-lease", "300")
        assert refused.returncode == 2, refused.stderr[-2000:]
        err = refused.stderr
        assert f"run {holder.run_id}" in err and f"host {holder.host}" in err and f"pid {first.pid}" in err
        assert re.search(r"expires \S+ \(in \d+ s\)", err), err
        assert "--wait-for-lease" in err and "Traceback" not in err
        assert took < 30
        a_out, a_err = first.communicate(timeout=300)
        assert first.returncode == 0, a_err[-3000:]
        w_out, w_err = waiter.communicate(timeout=300)
        assert waiter.returncode == 0, w_err[-3000:]
    finally:
        for p in (first, locals().get("waiter")):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert "waiting for the lease" in w_err and "nothing to do" in w_err, w_err[-3000:]
    _assert_each_id_ok_once(out_uri)
    runs = read_run_summaries(out_uri)  # the refused run wrote nothing: one summary each for the others
    assert [r["counts"]["attempted"] for r in runs] == [len(IDS), 0], [r["run_id"] for r in runs]
    assert runs[0]["run_id"] == holder.run_id
    assert read_holder(out_uri) is None  # both gave the lease back


@pytest.mark.slow
def test_a_sigkilled_runs_lease_lapses_and_is_taken_over(tmp_path, tiny_model_dir):
    """A SIGKILLed run gives nothing back. On the same host the next run sees its process gone and takes
    the lease at once (the SIGKILL tests of test_resume.py resume that way); here the holder is made to
    look like a run on a lost node: its lease is respected until it lapses, then taken over."""
    manifest = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    crashed = _popen(manifest, str(out), "--lease-ttl", "8")
    try:
        _wait_for(lambda: bool(_visible(out / "images", ".png")), "image", crashed)
        crashed.kill()
        crashed.wait(timeout=30)
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait()
    assert crashed.returncode == -signal.SIGKILL
    lease_file = out / "_lease.json"
    holder = json.loads(lease_file.read_text())
    assert holder["pid"] == crashed.pid  # a SIGKILL gives nothing back
    lease_file.write_text(json.dumps({**holder, "host": "lost-node-3"}))  # as if it ran on a node now gone
    refused = _run(manifest, str(out))
    if not read_holder(str(out)).expired():  # still within its TTL when the second run asked: refused
        assert refused.returncode == 2 and "lost-node-3" in refused.stderr, refused.stderr[-2000:]
    t0 = time.monotonic()
    resumed = _run(manifest, str(out), "--wait-for-lease")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "took over the lease" in resumed.stderr and "expired" in resumed.stderr
    assert time.monotonic() - t0 < 120
    _assert_each_id_ok_once(str(out))
    assert not lease_file.exists()


def test_status_shows_the_lease_and_takes_none(tmp_path, capsys):
    from pnp_batch.cli import main
    from pnp_batch.io.lease import Lease

    out = str(tmp_path / "out")
    assert main(["status", out]) == 2  # nothing written there yet: a mistyped OUT, said so
    (tmp_path / "out").mkdir()
    assert main(["status", out]) == 0
    assert "lease: free" in capsys.readouterr().out
    lease = Lease(out, "run-held", ttl=60)
    lease.acquire()
    try:
        assert main(["status", out]) == 0
        text = capsys.readouterr().out
        assert f"lease: held by run run-held on host {lease.host}, pid {lease.pid}; expires" in text
        assert read_holder(out).token == lease.token  # status changed nothing
    finally:
        lease.release()


def test_a_run_whose_lease_is_taken_over_stops(tmp_path, tiny_model_dir):
    """The heartbeat finds another run's token in the lease (this run could not renew it in time and it was
    taken over): the run stops without starting more groups, exit 1, summary `lease_lost`, and leaves
    the other run's lease alone."""
    import threading

    from pnp_batch.cli import main
    from pnp_batch.io import conditional
    from pnp_batch.io.lease import Holder, lease_uri

    manifest = _inputs(tmp_path / "in")
    out = str(tmp_path / "out")

    def take_over() -> None:
        _wait_for(lambda: _held(out), "lease", timeout=120)
        data, tag = conditional.read(lease_uri(out))
        theirs = Holder.parse(data)
        other = Holder(**{**theirs.__dict__, "run_id": "run-other", "token": "o" * 32})
        conditional.replace(lease_uri(out), other.to_json(), tag)

    thief = threading.Thread(target=take_over)
    thief.start()
    # 50 steps: the run must outlast the heartbeat (1 s at a 3 s TTL) that notices the takeover, even on a
    # quiet machine where the FAST settings finish every row within a second
    code = main(["run", str(manifest), "--out", out, *FAST, "--set", "steps=50", "--set", "inversion_steps=50",
                 "--no-report", "--lease-ttl", "3"])
    thief.join(10)
    assert code == 1
    (summary,) = read_run_summaries(out)
    assert summary["status"] == "lease_lost" and "run run-other" in summary["reason"], summary
    assert summary["counts"]["left_pending"] >= 1
    assert read_holder(out).run_id == "run-other"
