"""What runs inside a Ray actor of the Ray engine: one Translator, loaded once and kept; the
environment the driver hands its workers."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import asdict
from typing import Any

from pnp_batch.config import PipelineConfig
from pnp_batch.errors import UsageError
from pnp_batch.io import storage
from pnp_batch.io.policy import InputPolicy
from pnp_batch.io.records import resolve
from pnp_batch.io.rows import Row

# Environment passed to the workers (values never logged; only the names are).
ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "PNP_BATCH_CACHE", "HF_HOME", "HF_HUB_OFFLINE",
    "HF_TOKEN", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY",
    "PNP_BATCH_OUTAGE_TIMEOUT", "PNP_BATCH_OUTAGE_STORES",  # io/retry.py: how long to wait out an outage
)

def worker_env() -> dict[str, str]:
    """The storage/cache settings of this process that workers need (set ones only)."""
    return {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}


class TranslatorWorker:
    """The body of a Ray actor: one Translator, loaded once in the constructor and kept.

    Runs with ``max_concurrency=2``: while one group samples, the other reads its source bytes
    or writes its images; the compute itself is serialised by a lock.
    """

    def __init__(self, cfg: PipelineConfig, out: str, features: str, storage_options: dict[str, Any],
                 threads: int, evaluate: bool = False, layer_settings: tuple = (),
                 policy: InputPolicy | None = None) -> None:
        self.pid = os.getpid()
        self.host = socket.gethostname()
        try:
            import ray

            self.node = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - only used in the worker name
            self.node = self.host
        self.name = f"ray:{self.host}:{self.pid}" if self.node == self.host else f"ray:{self.host}/{self.node}:{self.pid}"
        self.lock = threading.Lock()
        self.translator = None
        self.error: dict[str, Any] | None = None
        try:
            import torch

            torch.set_num_threads(max(1, int(threads)))
            storage.configure(storage_options)
            storage.credentials.redact_logs()
            from pnp_batch.translate.translator import Translator

            self.translator = Translator(cfg, out, features, worker=self.name, evaluate=evaluate,
                                         layer_settings=layer_settings, policy=policy)
        except Exception as e:  # noqa: BLE001 - reported by info(), the driver decides
            self.error = {"type": type(e).__name__, "message": storage.redact(str(e))[:2000],
                          "usage": isinstance(e, UsageError)}

    def info(self) -> dict[str, Any]:
        """Who this worker is, and whether its model loaded."""
        out = {"worker": self.name, "pid": self.pid, "node": self.node, "error": self.error}
        if self.translator is not None:
            m = self.translator.models
            from pnp_batch.models.tiny import TEST_MODEL_NOTE

            out.update(model=m.fingerprint + (f" ({TEST_MODEL_NOTE})" if m.is_test_model else ""),
                       fingerprint=m.fingerprint, device=str(m.device), dtype=str(m.dtype))
        return out

    def process(self, groups: list[list[Row]], attempt: int) -> dict[str, Any]:
        """Translate a window of groups (inverted at once, PipelineConfig.window); returns
        their records and this worker's counters so far."""
        groups = [self.translator.prefetch(g) for g in groups]  # I/O outside the lock: overlaps sampling now
        with self.lock:
            started = self.translator.start_many(groups, attempt=attempt)
            counters = asdict(self.translator.counters)
        # The images are encoded and written outside the lock: the other window in flight samples meanwhile.
        return {"records": [rec for records in started for rec in resolve(records)], "counters": counters}

    def close(self) -> None:
        """Finish the writes still in flight (features: the last groups' images are already written)."""
        if self.translator is not None:
            self.translator.close()

    def process_counters(self) -> dict[str, int]:
        """This worker's UNet counters so far."""
        with self.lock:
            return asdict(self.translator.counters) if self.translator is not None else {}
