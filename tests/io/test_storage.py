"""storage.py: round trips (local, S3 via moto, HTTP), atomic writes, listing, URIs, redaction, retries."""

from __future__ import annotations

import http.server
import logging
import os
import threading
from collections.abc import Iterator
from functools import partial

import pytest

from pnp_batch.errors import TransientError
from pnp_batch.io import retry, storage


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(retry, "_sleep", slept.append)
    return slept


# ---- local -----------------------------------------------------------------------------------


def test_local_round_trip_creates_parents(tmp_path) -> None:
    uri = str(tmp_path / "a" / "b" / "x.bin")
    storage.write_bytes_atomic(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.read_bytes("file://" + uri) == b"hello"
    assert storage.exists(uri)
    storage.write_bytes_atomic(uri, b"second")
    assert storage.read_bytes(uri) == b"second"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # missing: not an error


def test_local_missing_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        storage.read_bytes(str(tmp_path / "nope.png"))


def test_atomic_write_leaves_no_visible_temp(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out" / "x.parquet"
    storage.write_bytes_atomic(str(target), b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk died before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        storage.write_bytes_atomic(str(target), b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"  # the old object is intact
    assert sorted(os.listdir(target.parent)) == ["x.parquet"]  # the temp file was cleaned up
    assert storage.list_files(str(tmp_path / "out")) == [str(target)]


def test_temp_files_are_hidden_names(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(os.path.basename(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    storage.write_bytes_atomic(str(tmp_path / "y.json"), b"{}")
    assert seen and seen[0].startswith(".y.json.")


def test_list_files_skips_hidden_and_underscore(tmp_path) -> None:
    for rel in ["a.parquet", "sub/b.parquet", ".tmp.parquet", "_SUCCESS", "_meta/c.parquet", "sub/.d.parquet",
                "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert storage.list_files(str(tmp_path), ".parquet") == [
        str(tmp_path / "a.parquet"), str(tmp_path / "sub" / "b.parquet"),
    ]
    assert storage.list_files(str(tmp_path / "missing")) == []


def test_join_resolve_parent_local_and_remote() -> None:
    assert storage.join("/data/out", "images", "x.png") == "/data/out/images/x.png"
    assert storage.join("s3://bk/out/", "images", "x.png") == "s3://bk/out/images/x.png"
    assert storage.resolve("/data/m", "img/a.png") == "/data/m/img/a.png"
    assert storage.resolve("/data/m", "../img/a.png") == "/data/img/a.png"
    assert storage.resolve("/data/m", "/abs/a.png") == "/abs/a.png"
    assert storage.resolve("/data/m", "s3://other/a.png") == "s3://other/a.png"
    assert storage.resolve("s3://bk/m", "img/a.png") == "s3://bk/m/img/a.png"
    assert storage.resolve("s3://bk/m/", "../a.png") == "s3://bk/a.png"
    assert storage.resolve("s3://bk", "a.png") == "s3://bk/a.png"
    assert storage.parent("s3://bk/m/x.parquet") == "s3://bk/m"
    assert storage.parent("/data/m/x.parquet") == "/data/m"
    assert storage.parent("x.parquet") == "."
    assert storage.is_remote("s3://bk/x") and storage.is_remote("https://h/x")
    assert not storage.is_remote("/x") and not storage.is_remote("file:///x") and not storage.is_remote("rel/x")


# ---- options and redaction ---------------------------------------------------------------------


def test_parse_storage_option() -> None:
    assert storage.parse_storage_option("anon=true") == ("anon", True)
    assert storage.parse_storage_option("client_kwargs.region_name=eu-west-1") == (
        "client_kwargs", {"region_name": "eu-west-1"},
    )
    assert storage.parse_storage_option("config_kwargs.retries={\"max_attempts\": 3}") == (
        "config_kwargs", {"retries": {"max_attempts": 3}},
    )
    assert storage.merge_options(["a.b=1", "a.c=2", "d=x"]) == {"a": {"b": 1, "c": 2}, "d": "x"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        storage.parse_storage_option("novalue")


def test_env_options_for_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY00")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.configure({"client_kwargs": {"region_name": "us-west-2"}, "requester_pays": True})
    opts = storage.storage_options("s3")
    assert opts["key"] == "AKIAEXAMPLEKEY00" and opts["secret"] == "very-secret-value-123"
    assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-west-2"}
    assert opts["requester_pays"] is True


def test_redact_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-abcdef")
    storage.configure({"password": "hunter2hunter2", "client_kwargs": {"aws_session_token": "tok-123456789"}})
    text = "failed: env-secret-abcdef / hunter2hunter2 / tok-123456789 / https://user:pw@host/x?X-Amz-Signature=abc"
    out = storage.redact(text)
    for s in ("env-secret-abcdef", "hunter2hunter2", "tok-123456789", "user:pw", "=abc"):
        assert s not in out
    assert "https://***@host/x" in out


def test_error_messages_never_contain_the_secret(monkeypatch: pytest.MonkeyPatch, no_sleep) -> None:
    secret = "leaky-secret-9876543210"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)

    def fails() -> bytes:
        raise OSError(f"SlowDown: request signed with {secret}")

    with pytest.raises(TransientError) as ei:
        storage.with_retries(fails, f"s3://bk/{secret}/x")
    assert secret not in str(ei.value)
    assert ei.value.__cause__ is None  # the raw message carried the secret: not chained

    def permanent() -> bytes:
        raise PermissionError(f"AccessDenied for {secret}")

    with pytest.raises(OSError) as ei2:
        storage.with_retries(permanent, "s3://bk/x")
    assert secret not in str(ei2.value)


# ---- retries -----------------------------------------------------------------------------------


def test_transient_failures_are_retried_then_succeed(no_sleep, caplog) -> None:
    calls = {"n": 0}

    def flaky() -> bytes:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise ConnectionResetError("Connection reset by peer")
        return b"ok"

    with caplog.at_level(logging.WARNING, logger="pnp_batch.io.storage"):
        assert storage.with_retries(flaky, "s3://bk/x") == b"ok"
    assert calls["n"] == 4
    assert len(no_sleep) == 3
    assert all(0 <= d <= retry.BACKOFF_CAP for d in no_sleep)
    assert sum("retry" in r.getMessage() for r in caplog.records) == 3


def test_retries_are_bounded(no_sleep, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry, "MAX_ATTEMPTS", 4)
    calls = {"n": 0}

    def always() -> bytes:
        calls["n"] += 1
        raise OSError("An error occurred (SlowDown) when calling the GetObject operation: Please reduce rate")

    with pytest.raises(TransientError, match="gave up after 4 attempts"):
        storage.with_retries(always, "s3://bk/x")
    assert calls["n"] == 4
    assert len(no_sleep) == 3


def test_permanent_failures_are_not_retried(no_sleep) -> None:
    calls = {"n": 0}

    def denied() -> bytes:
        calls["n"] += 1
        raise PermissionError("Access Denied")

    with pytest.raises(OSError, match="Access Denied"):
        storage.with_retries(denied, "s3://bk/x")
    assert calls["n"] == 1 and no_sleep == []

    def missing() -> bytes:
        calls["n"] += 1
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing, "s3://bk/y")
    assert calls["n"] == 2


def test_backoff_is_exponential_with_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry.random, "uniform", lambda lo, hi: hi)
    assert [retry._backoff(a) for a in range(1, 8)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_is_transient_classification() -> None:
    import botocore.exceptions as be

    throttled = be.ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Get")
    denied = be.ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get")
    assert storage.is_transient(throttled)
    assert not storage.is_transient(denied)
    assert storage.is_transient(be.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.is_transient(TimeoutError())
    assert not storage.is_transient(ValueError("bad"))
    wrapped = OSError(5, "Internal error")
    wrapped.__cause__ = throttled
    assert storage.is_transient(wrapped)


# ---- S3 (moto server, reached through AWS_ENDPOINT_URL like real AWS) ----------------------------


def test_s3_round_trip_and_listing(s3_bucket: str) -> None:
    uri = f"{s3_bucket}/out/results/a.parquet"
    storage.write_bytes_atomic(uri, b"one")
    storage.write_bytes_atomic(f"{s3_bucket}/out/results/sub/b.parquet", b"two")
    storage.write_bytes_atomic(f"{s3_bucket}/out/results/.tmp.parquet", b"hidden")
    storage.write_bytes_atomic(f"{s3_bucket}/out/results/_x/c.parquet", b"hidden")
    assert storage.read_bytes(uri) == b"one"
    assert storage.exists(uri) and not storage.exists(f"{s3_bucket}/out/none")
    assert storage.list_files(f"{s3_bucket}/out/results", ".parquet") == [
        f"{s3_bucket}/out/results/a.parquet", f"{s3_bucket}/out/results/sub/b.parquet",
    ]
    with storage.open_input(uri) as fh:
        assert fh.read() == b"one"
    assert storage.size(uri) == 3
    storage.write_bytes_atomic(uri, b"overwritten")
    assert storage.read_bytes(uri) == b"overwritten"
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


def test_s3_missing_bucket_message_has_no_secret(s3_server: str) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(FileNotFoundError) as ei:
        storage.read_bytes("s3://no-such-bucket-xyz/a.png")
    assert secret not in str(ei.value)


# ---- HTTP --------------------------------------------------------------------------------------


@pytest.fixture
def http_root(tmp_path) -> Iterator[str]:
    (tmp_path / "img.bin").write_bytes(b"\x00\x01data")
    handler = partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_http_read_and_404(http_root: str) -> None:
    assert storage.read_bytes(f"{http_root}/img.bin", timeout=5) == b"\x00\x01data"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{http_root}/missing.png", timeout=5)


def test_http_timeout_does_not_hang(no_sleep, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)  # accepts connections but never answers
    monkeypatch.setattr(retry, "MAX_ATTEMPTS", 2)
    try:
        with pytest.raises(TransientError, match="gave up after 2 attempts"):
            storage.read_bytes(f"http://127.0.0.1:{srv.getsockname()[1]}/x", timeout=0.3)
    finally:
        srv.close()
