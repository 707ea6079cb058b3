"""What the benchmark measures with: UNet call counters, peak memory, clocks, per-path statistics."""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch


class UNetCounter:
    """Counts UNet calls and batch elements with a forward pre-hook; keeps every call's batch size."""

    def __init__(self, unet, timed: bool = False) -> None:
        self.sizes: list[int] = []
        # timed (CPU only: on a GPU it would need a synchronisation per call): each call's wall time
        self.seconds: list[float] = []
        self._t0 = 0.0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        self._post = unet.register_forward_hook(self._done) if timed else None

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.sizes.append(int(sample.shape[0]))
        self._t0 = time.perf_counter()

    def _done(self, module, args, output):
        self.seconds.append(time.perf_counter() - self._t0)

    def call_seconds(self, start: int, stop: int) -> list[float] | None:
        """Wall time of calls start..stop (timed counters only)."""
        return self.seconds[start:stop] if self._post is not None else None

    def mark(self) -> int:
        return len(self.sizes)

    def since(self, mark: int) -> tuple[int, int]:
        s = self.sizes[mark:]
        return len(s), sum(s)

    def remove(self) -> None:
        self._handle.remove()
        if self._post is not None:
            self._post.remove()


def write_json(path: str | None, out: dict[str, Any]) -> None:
    """`pnp-batch bench --json PATH`: the figures as JSON (its folder made), and say where; nothing without a path."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"bench: wrote {path}")


def _rss_reader():
    """A function returning this process's resident bytes now, and its name; None where unavailable."""
    try:
        import psutil  # type: ignore[import-not-found]

        proc = psutil.Process()
        return (lambda: proc.memory_info().rss), "rss_growth_psutil"
    except ImportError:
        pass
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read, "rss_growth_proc_statm"
    return None, "ru_maxrss_growth"


class PeakMemory:
    """Peak memory of one measured block.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (absolute, weights included).
    CPU: peak resident-set growth over the block, sampled every 5 ms (psutil, else /proc/self/statm);
    without either, the growth of ru_maxrss (a lifetime high-water mark: 0 unless a new high is set).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
            self._read = None
        else:
            self._read, self.kind = _rss_reader()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._read is not None:
            self._base = self._max = self._read()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, self._read())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._read is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._read())
            self.peak = int(self._max - self._base)
        else:
            self.peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)


@dataclass
class PathStats:
    """One path at one K, summed over the sources."""

    images: int = 0
    inversion_unet_calls: int = 0
    inversion_batch_elements: int = 0
    sampling_unet_calls: int = 0
    sampling_batch_elements: int = 0
    seconds: float = 0.0
    inversion_seconds: float = 0.0  # UNet loops of inversion (and the reference's reconstruction)
    sampling_seconds: float = 0.0  # the sampling loop alone (no decode)
    other_seconds: float = 0.0  # image decode/encode, VAE, feature store
    peak_memory_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # wall time of each sampling UNet call, in order (CPU; not in to_dict): bench.figures pairs them
    # across repeats for the injection overhead
    sampling_call_seconds: list[float] = field(default_factory=list)

    @property
    def unet_calls(self) -> int:
        return self.inversion_unet_calls + self.sampling_unet_calls

    @property
    def batch_elements(self) -> int:
        return self.inversion_batch_elements + self.sampling_batch_elements

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(self.images, 1)

    def add_inversion(self, calls_elems: tuple[int, int]) -> None:
        self.inversion_unet_calls += calls_elems[0]
        self.inversion_batch_elements += calls_elems[1]

    def add_sampling(self, calls_elems: tuple[int, int]) -> None:
        self.sampling_unet_calls += calls_elems[0]
        self.sampling_batch_elements += calls_elems[1]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "unet_calls": self.unet_calls,
            "batch_elements": self.batch_elements,
            "seconds_per_image": self.seconds_per_image,
            "peak_memory_bytes": self.peak_memory_bytes,
            "images": self.images,
            "inversion_unet_calls": self.inversion_unet_calls,
            "inversion_batch_elements": self.inversion_batch_elements,
            "sampling_unet_calls": self.sampling_unet_calls,
            "sampling_batch_elements": self.sampling_batch_elements,
            "seconds": self.seconds,
            "inversion_seconds": self.inversion_seconds,
            "sampling_seconds": self.sampling_seconds,
            "other_seconds": self.other_seconds,
        }
        d.update(self.extra)
        return d


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class Timed:
    """Wraps a bound method to sum its wall time (synchronised clock)."""

    def __init__(self, fn, clock: Clock) -> None:
        self.fn, self.clock, self.seconds = fn, clock, 0.0

    def __call__(self, *a, **kw):
        t0 = self.clock()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += self.clock() - t0

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s



def dynamo_stats() -> tuple[int, int]:
    """torch.compile's own counters: graphs compiled so far, and graph breaks (with --compile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def graph_use(unet) -> dict[str, Any] | bool:
    """With --cuda-graphs on CUDA: graphs recorded, calls replayed and calls run eagerly (and why)."""
    from pnp_batch.pnp.graphs import GraphedUNet

    if not isinstance(unet, GraphedUNet):
        return False
    return {"graphs": unet.recorded, "replays": unet.replays, "eager_calls": unet.eager_calls,
            "capture_failed": unet.failed}
