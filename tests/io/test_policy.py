"""The input policy decides from the URI and a name lookup alone: every address class here is checked
with a stub resolver, and nothing connects anywhere."""

from __future__ import annotations

import logging
import os

import pytest

from pnp_batch.io.credentials import redact, redact_logs
from pnp_batch.io.inputs import check_row_input, open_row_input
from pnp_batch.io.policy import InputPolicy, InputRefused, numeric_host


def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        return table[host]
    return resolve


REFUSED = [
    ("http://127.0.0.1/x.png", "loopback"),
    ("http://127.1/x.png", "loopback"),
    ("http://2130706433/x.png", "loopback"),  # decimal
    ("http://0x7f000001/x.png", "loopback"),  # hexadecimal
    ("http://0177.0.0.1/x.png", "loopback"),  # octal
    ("http://0/x.png", "unspecified"),
    ("http://0.0.0.0:8080/x.png", "unspecified"),
    ("http://10.1.2.3/x.png", "private"),
    ("http://172.16.0.9/x.png", "private"),
    ("http://192.168.1.1/x.png", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # the cloud metadata service
    ("http://0xa9fea9fe/latest/", "link-local"),
    ("http://224.0.0.1/x.png", "multicast"),
    ("http://100.64.0.1/x.png", "reserved"),  # carrier-grade NAT: not public either
    ("http://[::1]/x.png", "loopback"),
    ("http://[::]/x.png", "unspecified"),
    ("http://[fe80::1%25eth0]/x.png", "link-local"),
    ("http://[fd12:3456::1]/x.png", "unique-local"),
    ("http://[ff02::1]/x.png", "multicast"),
    ("http://[::ffff:127.0.0.1]/x.png", "loopback"),  # IPv4-mapped
    ("http://[::ffff:a9fe:a9fe]/x.png", "link-local"),
    ("http://[2002:a00:1::]/x.png", "private"),  # 6to4 of 10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/x.png", "link-local"),  # NAT64 of 169.254.169.254
    ("https://[::ffff:10.0.0.1]:8443/x.png", "private"),
    ("http://internal.corp/x.png", "private"),  # a name that resolves to a private address
    ("http://mixed.example/x.png", "loopback"),  # one public, one loopback answer: refused
    ("http://v6.example/x.png", "link-local"),
    ("http://user:pw@127.0.0.1:9000/x.png", "loopback"),
]

NAMES = {
    "internal.corp": ["10.0.0.5"],
    "mixed.example": ["93.184.216.34", "127.0.0.1"],
    "v6.example": ["fe80::1"],
    "images.example": ["93.184.216.34", "2606:2800:220:1::1"],
}


@pytest.mark.parametrize("uri,why", REFUSED)
def test_non_public_addresses_are_refused_with_their_class(uri, why):
    policy = InputPolicy(resolver=_resolver(NAMES))
    with pytest.raises(InputRefused) as e:
        policy.check(uri)
    msg = str(e.value)
    assert msg.startswith(f"uri not allowed: {why} address"), msg
    assert "--allow-private-network" in msg and "--allow-uri" in msg
    assert "pw" not in msg  # user-info never echoed


@pytest.mark.parametrize("uri,why", REFUSED)
def test_allow_private_network_allows_every_address(uri, why):
    InputPolicy(allow_private_network=True, resolver=_resolver(NAMES)).check(uri)


def test_public_addresses_and_names_pass_and_the_checked_addresses_are_returned():
    policy = InputPolicy(resolver=_resolver(NAMES))
    assert policy.check_http("https://images.example/a.png") == ("images.example", 443,
                                                                 ["93.184.216.34", "2606:2800:220:1::1"])
    assert policy.check_http("http://93.184.216.34:8080/a.png") == ("93.184.216.34", 8080, ["93.184.216.34"])


def test_numeric_hosts_are_read_as_a_c_resolver_reads_them():
    assert str(numeric_host("2130706433")) == "127.0.0.1"
    assert str(numeric_host("0x7f.1")) == "127.0.0.1"
    assert str(numeric_host("0177.0.0.01")) == "127.0.0.1"
    assert str(numeric_host("[::ffff:7f00:1]")) == "::ffff:7f00:1"
    assert numeric_host("images.example") is None
    assert numeric_host("1e3.example") is None


def test_allow_uri_prefix_allows_that_service_only():
    policy = InputPolicy(allow_uri=("http://10.0.0.5:9000/bucket/",), resolver=_resolver(NAMES))
    policy.check("http://10.0.0.5:9000/bucket/a.png")
    policy.check("http://user:pw@10.0.0.5:9000/bucket/a.png")  # user-info is not part of the match
    for other in ("http://10.0.0.5:9001/bucket/a.png", "http://10.0.0.5:9000/other/a.png",
                  "http://10.0.0.6:9000/bucket/a.png"):
        with pytest.raises(InputRefused):
            policy.check(other)


def test_local_files_only_under_a_local_manifests_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    os.symlink(tmp_path / "secret.png", tmp_path / "m" / "link.png")
    policy = InputPolicy.for_manifest(str(tmp_path / "m" / "manifest.csv"))
    assert policy.local_root == os.path.realpath(tmp_path / "m")
    policy.check(str(tmp_path / "m" / "a.png"))
    policy.check("file://" + str(tmp_path / "m" / "a.png"))
    for bad in (str(tmp_path / "secret.png"), "file://" + str(tmp_path / "secret.png"), "/etc/passwd",
                "file:///etc/passwd", str(tmp_path / "m" / ".." / "secret.png"), str(tmp_path / "m" / "link.png")):
        with pytest.raises(InputRefused, match="outside the manifest's folder"):
            policy.check(bad)
    opened = InputPolicy.for_manifest(str(tmp_path / "m" / "manifest.csv"), allow_uri=(str(tmp_path) + "/",))
    opened.check(str(tmp_path / "secret.png"))
    assert open_row_input(str(tmp_path / "secret.png"), opened) == b"s"


def test_a_remote_manifest_reads_no_local_file_and_object_stores_need_listing():
    policy = InputPolicy.for_manifest("s3://bucket/manifests/m.parquet")
    assert policy.local_root is None
    policy.check("s3://bucket/images/a.png")
    policy.check("s3a://bucket/images/a.png")
    with pytest.raises(InputRefused, match="local file"):
        policy.check("/etc/hostname")
    with pytest.raises(InputRefused, match="local file"):
        policy.check("file:///etc/hostname")
    for scheme in ("gs", "memory", "ftp", "hf"):
        assert "is not an allowed object store" in check_row_input(f"{scheme}://x/y.png", policy)
    InputPolicy(allow_uri=("gs://",)).check("gs://bucket/a.png")


def test_nothing_is_read_for_a_refused_uri(tmp_path, monkeypatch):
    from pnp_batch.io import storage

    monkeypatch.setattr(storage, "read_bytes", lambda *a, **k: pytest.fail("read a refused URI"))
    with pytest.raises(InputRefused):
        open_row_input("/etc/hostname", InputPolicy.for_manifest(str(tmp_path / "m.csv")))


def test_the_summary_describes_the_effective_policy(tmp_path):
    d = InputPolicy.for_manifest(str(tmp_path / "m.csv"), allow_uri=("http://u:secretpassword@10.0.0.5/b/",)).describe()
    assert d["http"] == "public addresses only"
    assert d["local_files"] == f"under {os.path.realpath(tmp_path)}"
    assert d["allow_uri"] == ["http://***@10.0.0.5/b/"]
    assert d["schemes"] == ["http", "https", "s3", "s3a"]


@pytest.mark.parametrize("text,kept", [
    ("http://alice:PASSWORD@127.0.0.1:9/missing.png", "http://***@127.0.0.1:9/missing.png"),
    ("https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAXXX%2F2026"
     + "&X-Amz-Signature=abcdef0123&X-Amz-Security-Token=tok123",
     "https://b.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     + "&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://a.blob.core.windows.net/c/a.png?sv=2022&sig=SIGVALUE&se=2026",
     "https://a.blob.core.windows.net/c/a.png?sv=2022&sig=***&se=2026"),
    ("https://cdn.example/a.png?token=T0KEN&w=5", "https://cdn.example/a.png?token=***&w=5"),
])
def test_redaction_keeps_the_location_and_drops_the_secret(text, kept):
    assert redact(text) == kept


def test_every_log_line_is_redacted(caplog):
    redact_logs()
    redact_logs()  # idempotent
    with caplog.at_level(logging.INFO):
        logging.getLogger("pnp_batch.test").warning("could not read %s", "http://alice:PASSWORD@host/x.png?sig=S1G")
    assert "PASSWORD" not in caplog.text and "S1G" not in caplog.text
    assert "http://***@host/x.png?sig=***" in caplog.text
