"""The bench's CPU thread choice reads what competes now (a /proc/stat sample), not the 1-minute load
average, which still counts a bench that has just ended (back-to-back runs)."""

from __future__ import annotations

import os

import torch

from pnp_batch.bench import inputs


def test_busy_cores_is_the_sampled_share_of_the_cpus(monkeypatch):
    samples = iter([(100.0, 1000.0), (175.0, 1100.0)])  # 75 of 100 ticks busy
    monkeypatch.setattr(inputs, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(inputs.time, "sleep", lambda s: None)
    monkeypatch.setattr(inputs.os, "getloadavg", lambda: (99.0, 99.0, 99.0))  # not read
    busy, seen = inputs.busy_cores()
    assert busy == 0.75 * (os.cpu_count() or 1)
    assert seen.startswith("75% of the CPUs busy")


def test_a_busy_machine_runs_one_thread_an_idle_one_keeps_its_threads(monkeypatch):
    monkeypatch.delenv("PNP_BENCH_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(inputs, "busy_cores", lambda: (0.1, "idle"))
        assert inputs.set_threads(torch.device("cpu")).startswith("torch threads 2 (idle")
        monkeypatch.setattr(inputs, "busy_cores", lambda: (10.0 * (os.cpu_count() or 1), "busy"))
        assert inputs.set_threads(torch.device("cpu")).startswith("torch threads 1 (busy")
    finally:
        torch.set_num_threads(before)


def test_without_proc_stat_the_load_average_decides(monkeypatch):
    monkeypatch.setattr(inputs, "_cpu_times", lambda: None)
    monkeypatch.setattr(inputs.os, "getloadavg", lambda: (1.5, 1.0, 1.0))
    assert inputs.busy_cores() == (1.5, "load average 1.5")
