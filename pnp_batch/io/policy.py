"""The input policy: which URIs a manifest row may make a worker read (sources now; masks and image
prompts use the same check).

A manifest is someone else's input, and the workers that read it sit inside a cloud account. By
default a row may name:

* an object in an object store (``s3://``, ``s3a://``); other fsspec schemes only when listed with
  ``--allow-uri SCHEME://`` (or a longer prefix);
* an ``http(s)://`` URL whose host resolves to public addresses only: loopback, private, link-local
  (the cloud metadata service's kind), unique-local, multicast, unspecified and reserved addresses
  are refused, IPv4 and IPv6, IPv4-mapped / 6to4 / NAT64 / Teredo forms and numeric hosts
  (``2130706433``, ``0x7f.1``, ``0177.0.0.1``) included. The host is resolved once; the fetch
  connects to the address that was checked (io/fetch.py) and checks every redirect the same way;
* a local path or ``file://`` URI only when the manifest itself is a local file, and then only under
  the manifest's folder (symbolic links resolved).

``--allow-uri PREFIX`` (pipeline key ``allow_uri``) allows every URI that starts with PREFIX (for a
URL: the address check is skipped for it; for a path: anything under that folder);
``--allow-private-network`` (``allow_private_network``) allows http(s) to any address.

Everything here decides from the URI and a name lookup alone: nothing is read and no connection is
made (tests check refused address classes with a stub resolver, never by connecting).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pnp_batch.errors import RowError
from pnp_batch.io.credentials import redact

# Object-store schemes a row may name without being listed.
DEFAULT_SCHEMES = ("s3", "s3a")
_HTTP = ("http", "https")
_LOCAL = ("", "file", "local")

Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HINT = "(allow with --allow-uri PREFIX or the pipeline key allow_uri"


class InputRefused(RowError):
    """A row's URI is not allowed by the input policy: the row fails with this reason, nothing is read."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (one lookup)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RowError(f"cannot resolve host {host!r}: {e.strerror or e}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def numeric_host(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a numeric host stands for, in every form a C resolver accepts (dotted, decimal,
    octal, hexadecimal, short forms like ``127.1``, bracketed IPv6 with a zone), else None."""
    h = host.strip("[]")
    if "%" in h:
        h = h.split("%", 1)[0]
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        pass
    if h and all(c in "0123456789abcdefxABCDEFX." for c in h) and h[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(h))
        except OSError:
            return None
    return None


def _embedded(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip))
    return None


def address_class(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` is not a public address ("loopback", "private", ...), or None when it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded(ip)
        if inner is not None:
            return address_class(inner)
    for name, test in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast)):
        if test:
            return name
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.ip_network("fc00::/7"):
        return "unique-local"
    if ip.is_private:
        return "private"
    if ip.is_reserved or not ip.is_global:
        return "reserved"
    return None


def split_uri(uri: str) -> tuple[str, str]:
    """(scheme, rest); scheme "" for a plain path."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme and scheme[0].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme):
            return scheme.lower(), rest
    return "", uri


def _local_path(uri: str) -> str:
    scheme, rest = split_uri(uri)
    path = os.path.expanduser(rest) if scheme == "" else ("/" + rest.lstrip("/"))
    return os.path.realpath(path)


def _under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder if folder.endswith("/") else folder + "/")


@dataclass(frozen=True)
class InputPolicy:
    """What a run may read. Frozen and plain, so it travels to Ray workers with the request."""

    local_root: str | None = None  # the local manifest's folder (real path), else None: no local reads
    allow_uri: tuple[str, ...] = ()
    allow_private_network: bool = False
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    resolver: Resolver | None = field(default=None, compare=False, repr=False)  # tests: a stub

    @classmethod
    def for_manifest(cls, manifest_uri: str | None, allow_uri: Iterable[str] = (),
                     allow_private_network: bool = False) -> InputPolicy:
        """The policy of a run of ``manifest_uri`` (local reads only under its folder)."""
        root = None
        if manifest_uri is not None and split_uri(manifest_uri)[0] in _LOCAL:
            path = _local_path(manifest_uri)
            root = path if os.path.isdir(path) else os.path.dirname(path)
        return cls(local_root=root, allow_uri=tuple(allow_uri), allow_private_network=bool(allow_private_network))

    def describe(self) -> dict[str, Any]:
        """The effective policy, for the run summary (prefixes redacted)."""
        return {
            "schemes": sorted({*self.schemes, "http", "https"}),
            "http": "any address" if self.allow_private_network else "public addresses only",
            "local_files": f"under {self.local_root}" if self.local_root else "refused (the manifest is not local)",
            "allow_uri": [redact(p) for p in self.allow_uri],
            "allow_private_network": self.allow_private_network,
        }

    # ---------------------------------------------------------------------------------------------

    def allowed_by_prefix(self, uri: str) -> bool:
        scheme, _ = split_uri(uri)
        for prefix in self.allow_uri:
            pscheme, _ = split_uri(prefix)
            if scheme in _LOCAL and pscheme in _LOCAL:
                if _under(_local_path(uri), _local_path(prefix)):
                    return True
            elif scheme not in _LOCAL and pscheme not in _LOCAL and _norm_url(uri).startswith(_norm_url(prefix)):
                return True
        return False

    def check(self, uri: str) -> None:
        """Raise :class:`InputRefused` unless ``uri`` may be read; an http(s) host is resolved here
        (see :meth:`check_http` for the addresses to connect to)."""
        scheme, _ = split_uri(uri)
        if scheme in _HTTP:
            self.check_http(uri)
            return
        if self.allowed_by_prefix(uri):
            return
        if scheme in _LOCAL:
            if self.local_root is None:
                raise InputRefused(f"uri not allowed: local file {redact(uri)} (local files are read only for a local "
                                   f"manifest, under its folder) {_HINT})")
            if not _under(_local_path(uri), self.local_root):
                raise InputRefused(f"uri not allowed: local file {redact(uri)} is outside the manifest's folder "
                                   f"{self.local_root} {_HINT})")
            return
        if scheme in self.schemes:
            return
        raise InputRefused(f"uri not allowed: scheme {scheme}:// is not an allowed object store "
                           f"{_HINT}, e.g. --allow-uri {scheme}://)")

    def check_http(self, uri: str) -> tuple[str, int, list[str]]:
        """(host, port, the addresses to connect to) for an http(s) URI, all of them checked."""
        parts = urllib.parse.urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in _HTTP:
            raise InputRefused(f"uri not allowed: a redirect to {scheme}:// ({redact(uri)})")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise InputRefused(f"uri not allowed: bad host or port in {redact(uri)}") from None
        if not host:
            raise InputRefused(f"uri not allowed: no host in {redact(uri)}")
        port = port or (443 if scheme == "https" else 80)
        numeric = numeric_host(host)
        if numeric is not None:
            addresses = [str(numeric)]
        else:
            addresses = (self.resolver or system_resolver)(host, port)
            if not addresses:
                raise RowError(f"cannot resolve host {host!r}")
        if self.allow_private_network or self.allowed_by_prefix(uri):
            return host, port, addresses
        for a in addresses:
            ip = ipaddress.ip_address(a.split("%", 1)[0])
            why = address_class(ip)
            if why is not None:
                inner = _embedded(ip) if isinstance(ip, ipaddress.IPv6Address) else None
                bare = host.strip("[]")
                shown = bare if bare == str(ip) else f"{bare} ({ip})"
                if inner is not None:
                    shown += f", IPv4 {inner} inside"
                raise InputRefused(f"uri not allowed: {why} address {shown} {_HINT}, "
                                   "or --allow-private-network)")
        return host, port, addresses


def _norm_url(uri: str) -> str:
    """A URL with its scheme and host lower-cased and user-info dropped, for prefix matching."""
    scheme, rest = split_uri(uri)
    netloc, sep, path = rest.partition("/")
    netloc = netloc.rsplit("@", 1)[-1].lower()
    return f"{scheme}://{netloc}{sep}{path}"
