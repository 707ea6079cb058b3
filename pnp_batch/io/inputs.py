"""The one place a manifest row's inputs are opened: a source image today, masks and image prompts
the same way. Every URI passes the run's input policy (io/policy.py) before any byte is read."""

from __future__ import annotations

from pnp_batch.errors import RowError
from pnp_batch.io import storage
from pnp_batch.io.fetch import fetch
from pnp_batch.io.policy import InputPolicy, InputRefused, split_uri


def open_row_input(uri: str, policy: InputPolicy | None, timeout: float = 60) -> bytes:
    """The bytes of ``uri`` if ``policy`` allows it, else :class:`~pnp_batch.io.policy.InputRefused`.

    ``policy=None`` is for the project's own trusted callers only (the bench, tests of other stages):
    every engine, ``eval`` and ``report`` pass the run's policy."""
    if "://***@" in uri:  # a URI as recorded (credentials redacted): asking with them would be wrong
        raise RowError("its credentials were redacted from the record; read it from the manifest instead")
    if policy is None:
        return storage.read_bytes(uri, timeout)
    scheme, _ = split_uri(uri)
    if scheme in ("http", "https"):
        refused: list[InputRefused] = []

        def get() -> bytes:
            try:
                return fetch(uri, policy, timeout)
            except InputRefused as e:  # a row's reason, as is (retries would wrap it)
                refused.append(e)
                raise
        try:
            return storage.with_retries(get, uri)
        except OSError:
            if refused:
                raise refused[-1] from None
            raise
    policy.check(uri)
    return storage.read_bytes(uri, timeout)


def check_row_input(uri: str, policy: InputPolicy) -> str | None:
    """Why ``policy`` refuses ``uri`` (the row's error), or None; nothing is read (``validate``)."""
    try:
        policy.check(uri)
    except RowError as e:
        return str(e)
    return None


def output_policy(out: str) -> InputPolicy:
    """The input policy of an output's latest run (its manifest's folder, its policy keys): a report
    reads the sources only where that run could."""
    from pnp_batch.io.results import read_run_summaries

    manifest, cfg = None, {}
    for summary in read_run_summaries(out):
        manifest = summary.get("manifest") or manifest
        cfg = summary.get("config") or cfg
    return InputPolicy.for_manifest(manifest, cfg.get("allow_uri") or (), bool(cfg.get("allow_private_network")))
