"""HTTP(S) GET for manifest inputs, under the input policy (io/policy.py).

* The host is resolved once, by the policy, and the connection goes to an address that was checked
  (no second lookup a DNS answer could change in between); TLS still verifies the certificate
  against the host name (SNI).
* Redirects are followed by hand (at most ``MAX_REDIRECTS``), each target checked like the first URL;
  credentials are not sent to another origin.
* ``http://user:password@host/...``: the user-info becomes a Basic ``Authorization`` header (it is
  never part of the host), and never appears in a message.
* A refused URL is never contacted, so nothing of its response can reach an error, log or record.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import urllib.parse

from pnp_batch.errors import RowError, TransientError
from pnp_batch.io.credentials import redact
from pnp_batch.io.policy import InputPolicy, InputRefused

MAX_REDIRECTS = 5
MAX_BYTES = 1 << 30  # an input larger than 1 GiB is refused while reading


class _Pinned:
    """Mixin: connect to ``self.pinned`` (a checked address) instead of looking ``self.host`` up."""

    pinned: str

    def _open(self) -> socket.socket:
        return socket.create_connection((self.pinned, self.port), self.timeout)  # type: ignore[attr-defined]


class _HTTP(_Pinned, http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = self._open()


class _HTTPS(_Pinned, http.client.HTTPSConnection):
    def connect(self) -> None:
        sock = self._open()
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _auth_header(parts: urllib.parse.SplitResult) -> str | None:
    if parts.username is None:
        return None
    user = urllib.parse.unquote(parts.username)
    password = urllib.parse.unquote(parts.password or "")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int | None]:
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


def fetch(uri: str, policy: InputPolicy, timeout: float = 60, context: ssl.SSLContext | None = None) -> bytes:
    """The body of ``uri`` (http or https), every hop checked by ``policy``."""
    first = urllib.parse.urlsplit(uri)
    auth = _auth_header(first)
    url = uri
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        host, port, addresses = policy.check_http(url)
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        headers = {"User-Agent": "pnp-batch", "Accept": "*/*"}
        if auth is not None and _origin(parts) == _origin(first):
            headers["Authorization"] = auth
        conn = _connection(parts.scheme.lower(), host, port, addresses[0], timeout, context)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            if status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                resp.read(65536)
                if not location:
                    raise RowError(f"HTTP {status} without a Location from {redact(url)}")
                url = urllib.parse.urljoin(url, location)
                continue
            if status in (404, 410):
                raise FileNotFoundError(redact(f"not found: {uri} (HTTP {status})"))
            if status >= 500 or status in (408, 429):
                raise TransientError(redact(f"HTTP {status} from {uri}"))
            if status >= 400:
                raise RowError(redact(f"HTTP {status} from {uri}"))
            data = resp.read(MAX_BYTES + 1)
            if len(data) > MAX_BYTES:
                raise RowError(redact(f"{uri} is larger than {MAX_BYTES} bytes"))
            return data
        except (InputRefused, RowError, FileNotFoundError, TransientError):
            raise
        except (OSError, http.client.HTTPException) as e:
            raise TransientError(redact(f"{uri}: {type(e).__name__}: {e}")) from None
        finally:
            conn.close()
    raise RowError(redact(f"more than {MAX_REDIRECTS} redirects from {uri}"))


def _connection(scheme: str, host: str, port: int, address: str, timeout: float,
                context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if scheme == "https":
        conn: http.client.HTTPConnection = _HTTPS(host, port, timeout=timeout,
                                                  context=context or ssl.create_default_context())
    else:
        conn = _HTTP(host, port, timeout=timeout)
    conn.pinned = address  # type: ignore[attr-defined]
    return conn
