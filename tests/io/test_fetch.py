"""io/fetch.py against a server on 127.0.0.1. A guard fails the test if anything tries to connect to
an address outside 127.0.0.0/8: refused redirect targets are checked, never contacted."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pnp_batch.io import fetch as fetch_mod
from pnp_batch.io.fetch import fetch
from pnp_batch.io.inputs import open_row_input
from pnp_batch.io.policy import InputPolicy, InputRefused

BODY = b"\x89PNG not really"


class _Server:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None, str | None]] = []  # path, Authorization, Host
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization"), self.headers.get("Host")))
                if self.path.startswith("/to/"):
                    self.send_response(302)
                    self.send_header("Location", "http://" + self.path[len("/to/"):])
                    self.end_headers()
                    return
                if self.path == "/missing.png":
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b"secret internal page")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch) -> list[str]:
    """Every connection fetch makes goes through this: anything but loopback fails the test."""
    seen: list[str] = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        seen.append(address[0])
        assert ipaddress.ip_address(address[0]).is_loopback, f"tried to connect to {address[0]}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(fetch_mod.socket, "create_connection", guarded)
    return seen


def test_loopback_is_refused_by_default_and_the_server_sees_nothing(server):
    with pytest.raises(InputRefused, match="loopback address 127.0.0.1"):
        open_row_input(f"{server.base}/a.png", InputPolicy())
    assert server.requests == []


def test_allow_uri_lets_that_server_be_read(server):
    policy = InputPolicy(allow_uri=(f"{server.base}/",))
    assert open_row_input(f"{server.base}/a.png", policy) == BODY
    assert [r[0] for r in server.requests] == ["/a.png"]


def test_user_info_becomes_an_authorization_header(server):
    policy = InputPolicy(allow_private_network=True)
    assert fetch(f"http://alice:pa%3Ass@127.0.0.1:{server.port}/a.png", policy) == BODY
    _, auth, host = server.requests[0]
    assert auth == "Basic YWxpY2U6cGE6c3M="  # alice:pa:ss
    assert host == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("target", ["169.254.169.254/latest/meta-data/", "10.0.0.1/x.png", "[::ffff:10.0.0.1]/x",
                                    "2130706433/x.png"])
def test_a_redirect_to_a_refused_address_is_refused_without_contacting_it(server, loopback_only, target):
    policy = InputPolicy(allow_uri=(f"{server.base}/",))
    with pytest.raises(InputRefused, match="uri not allowed"):
        open_row_input(f"{server.base}/to/{target}", policy)
    assert [r[0] for r in server.requests] == [f"/to/{target}"]
    assert loopback_only == ["127.0.0.1"]  # the refused target was never connected to


def test_a_redirect_is_followed_where_allowed_without_the_credentials_of_another_origin(server):
    other = _Server()
    try:
        policy = InputPolicy(allow_private_network=True)
        got = fetch(f"http://bob:secret@127.0.0.1:{server.port}/to/127.0.0.1:{other.port}/b.png", policy)
        assert got == BODY
        assert server.requests[0][1] is not None
        assert other.requests == [("/b.png", None, f"127.0.0.1:{other.port}")]
    finally:
        other.httpd.shutdown()


def test_the_checked_address_is_the_one_connected_to(server, loopback_only):
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])  # a second lookup would get a private address

    policy = InputPolicy(allow_uri=(f"http://images.test:{server.port}/",), resolver=lambda h, p: next(answers))
    assert fetch(f"http://images.test:{server.port}/a.png", policy) == BODY
    assert server.requests[0][2] == f"images.test:{server.port}"  # the name in Host, the checked address dialled
    assert loopback_only == ["127.0.0.1"]


def test_not_found_says_so_without_the_servers_words(server):
    policy = InputPolicy(allow_private_network=True)
    with pytest.raises(FileNotFoundError) as e:
        open_row_input(f"http://u:topsecret1@127.0.0.1:{server.port}/missing.png", policy)
    assert "secret internal page" not in str(e.value) and "topsecret1" not in str(e.value)
