"""An outage of the output store, end to end: the run writes to S3 (moto's server) through a TCP proxy
that the test closes (connections refused, open ones cut) and opens again on the same port. Scaled down to
seconds: --outage-timeout and botocore's own retries are passed as options.

* Back within the limit: the run pauses, goes on by itself, and ends as an uninterrupted run (exit 0,
  every id ok once, no failed record).
* Gone for longer: the run stops (exit 1, a clear message, no traceback), records no row as failed for the
  store's fault, and the next run, once the store is back, finishes the rest: 0 lost, 0 duplicated.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest
from test_resume import FAST, IDS, START_TIMEOUT, _env, _inputs

SCALED = ["--storage-option", "config_kwargs.retries.max_attempts=1"]  # one botocore try per call of ours


class Proxy:
    """A TCP proxy on a fixed local port to ``target``; ``close`` refuses and cuts connections, ``open``
    accepts them again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def open(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def close(self) -> None:
        srv, self.listener = self.listener, None
        if srv is not None:
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)
            srv.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxied(s3_server, s3_bucket):
    host, port = s3_server.removeprefix("http://").split(":")
    proxy = Proxy((host, int(port)))
    proxy.open()
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")  # straight to moto
    env = _env()
    env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
    try:
        yield proxy, client, s3_bucket.removeprefix("s3://"), env
    finally:
        proxy.close()


def _keys(client, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def _records(client, bucket: str) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    rows: list[dict] = []
    for key in _keys(client, bucket, "out/results/"):
        if key.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()
    return rows


def _cmd(manifest: Path, bucket: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pnp_batch", "run", str(manifest), "--out", f"s3://{bucket}/out", *FAST,
            "--no-report", *SCALED, *extra]


def _start_then_cut(proxy: Proxy, client, bucket: str, manifest: Path, env: dict, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(manifest, bucket, *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not _keys(client, bucket, "out/images/"):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no image within the start timeout"
        time.sleep(0.02)
    proxy.close()
    return proc


@pytest.mark.slow
def test_a_short_outage_pauses_the_run_which_then_finishes(tmp_path, proxied, tiny_model_dir):
    proxy, client, bucket, env = proxied
    manifest = _inputs(tmp_path / "in")
    proc = _start_then_cut(proxy, client, bucket, manifest, env, "--outage-timeout", "120")
    try:
        time.sleep(10)  # longer than the ordinary retries (about 3 s here)
        assert proc.poll() is None, "the run did not wait for the store: " + proc.stderr.read()[-3000:]
        proxy.open()
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert "the store is unreachable" in err and "reachable again" in err, err[-3000:]
    records = _records(client, bucket)
    assert {r["status"] for r in records} == {"ok"}
    assert sorted(r["id"] for r in records) == IDS  # each id once: nothing lost, nothing done twice
    assert sorted(_keys(client, bucket, "out/images/")) == [f"out/images/{i}.png" for i in IDS]
    assert not _keys(client, bucket, "out/_lease.json")


@pytest.mark.slow
def test_a_long_outage_stops_the_run_and_the_next_run_finishes(tmp_path, proxied, tiny_model_dir):
    proxy, client, bucket, env = proxied
    manifest = _inputs(tmp_path / "in")
    proc = _start_then_cut(proxy, client, bucket, manifest, env, "--outage-timeout", "3", "--lease-ttl", "5")
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "longer than --outage-timeout 3 s" in err and "re-run the same command" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert all(r["status"] == "ok" for r in _records(client, bucket))  # no row failed for the store's fault

    proxy.open()
    time.sleep(5)  # the stopped run could not give its lease back: it lapses
    r = subprocess.run(_cmd(manifest, bucket, "--wait-for-lease", "60"), env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    records = _records(client, bucket)
    assert {rec["status"] for rec in records} == {"ok"}
    ok = Counter(rec["id"] for rec in records)
    assert sorted(ok) == IDS and max(ok.values()) == 1, ok
