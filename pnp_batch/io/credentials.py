"""Storage options and credentials: the AWS environment, `--storage-option`, and redaction.

Options set with ``set_options`` are merged over the standard AWS variables for ``s3://``;
``redact`` removes every secret this process knows of from a text before it is logged or raised.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

_LOCK = threading.Lock()
_OPTIONS: dict[str, Any] = {}
_S3 = {"s3", "s3a"}
_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential", re.IGNORECASE)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")
# Shorter values are not redacted: they are not real secrets and replacing them would mangle text.
_MIN_SECRET_LEN = 8
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SIGNED_QUERY = re.compile(
    r"(?<![\w-])(?P<name>X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|X-Goog-Credential"
    r"|Signature|AWSAccessKeyId|sig|token|access_token)=[^&\s#\"'<>]+",
    re.IGNORECASE,
)



def set_options(storage_options: dict[str, Any] | None) -> None:
    """Set the process-wide options; ``None`` clears them (storage.configure also drops cached file systems)."""
    global _OPTIONS
    with _LOCK:
        _OPTIONS = dict(storage_options or {})


def configured_options() -> dict[str, Any]:
    """A deep copy of the options set with ``set_options``."""
    with _LOCK:
        return json.loads(json.dumps(_OPTIONS, default=str)) if _OPTIONS else {}


def storage_options(protocol: str = "s3") -> dict[str, Any]:
    """The options used for ``protocol``: configured ones over the AWS environment (for s3)."""
    opts: dict[str, Any] = {}
    if protocol in _S3:
        env = os.environ
        if env.get("AWS_PROFILE"):
            opts["profile"] = env["AWS_PROFILE"]
        if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            opts["key"] = env["AWS_ACCESS_KEY_ID"]
            opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
            if env.get("AWS_SESSION_TOKEN"):
                opts["token"] = env["AWS_SESSION_TOKEN"]
        client: dict[str, Any] = {}
        if env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"):
            client["endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env["AWS_ENDPOINT_URL"]
        region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION")
        if region:
            client["region_name"] = region
        if client:
            opts["client_kwargs"] = client
        # Listings must reflect our own writes (resume reads the results we just wrote).
        opts["use_listings_cache"] = False
    return _deep_merge(opts, configured_options())


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_storage_option(item: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` from ``--storage-option``; JSON values where possible.

    A dotted key nests: ``client_kwargs.region_name=eu-west-1`` gives
    ``("client_kwargs", {"region_name": "eu-west-1"})``.
    """
    if "=" not in item:
        raise ValueError(f"--storage-option {redact(item)!r} must be KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError("--storage-option needs a key before '='")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    parts = key.split(".")
    for part in reversed(parts[1:]):
        value = {part: value}
    return parts[0], value


def merge_options(items: list[str]) -> dict[str, Any]:
    """Parse several ``KEY=VALUE`` items into one nested options dict."""
    out: dict[str, Any] = {}
    for item in items:
        k, v = parse_storage_option(item)
        out = _deep_merge(out, {k: v})
    return out


def _secret_values() -> list[str]:
    found: list[str] = []

    def walk(obj: Any, secret: bool) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, secret or bool(_SECRET_NAME.search(str(k))))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, secret)
        elif secret and isinstance(obj, str) and len(obj) >= _MIN_SECRET_LEN:
            found.append(obj)

    with _LOCK:
        walk(_OPTIONS, False)
    for name in _SECRET_ENV:
        v = os.environ.get(name)
        if v and len(v) >= _MIN_SECRET_LEN:
            found.append(v)
    return sorted(set(found), key=len, reverse=True)


def redact(text: str) -> str:
    """Remove configured secrets, AWS secret env values, URL passwords and signatures from ``text``."""
    text = str(text)
    for s in _secret_values():
        text = text.replace(s, "***")
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    return _SIGNED_QUERY.sub(r"\g<name>=***", text)


class _RedactingFactory:
    """A log record factory whose records carry their message redacted (every handler, every logger)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record = self.inner(*args, **kwargs)
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report
            return record
        clean = redact(msg)
        if clean != msg or record.args:
            record.msg, record.args = clean, ()
        return record


def redact_logs() -> None:
    """Redact every log line of this process (URI passwords, signed query strings, known secrets);
    called by the command line and by each Ray worker. Idempotent."""
    import logging

    current = logging.getLogRecordFactory()
    if not isinstance(current, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(current))
