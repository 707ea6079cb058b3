"""The bench's sweep figure (sweep_vs_floor_elements, counted) and --repeats (medians and spreads)."""

from __future__ import annotations

import json

import pytest

from pnp_batch.bench.figures import combine_repeats
from pnp_batch.cli import main

STEPS = 4


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--arch", "tiny", "--device", "cpu", "--resolution", "64", "--steps", str(STEPS),
            "--reference-inversion-steps", "8", "--k", "2", "--repeats", "2", "--json", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_sweep_counts_one_inversion_and_one_source_branch(figures):
    sw = figures["sweep"]
    assert sw["settings"] == 18 and sw["grid"]["pnp_f_t"] == [0.4, 0.6, 0.8]
    assert (sw["inversion_unet_calls"], sw["inversion_batch_elements"]) == (STEPS, STEPS)
    source = int(STEPS * 0.8)  # steps with any injection: the largest pnp_f_t of the grid
    assert sw["sampling_batch_elements"] == 36 * STEPS + source
    assert sw["floor_batch_elements"] == 36 * STEPS  # 18 plain samplings: 2 elements per step each
    assert sw["sweep_vs_floor_elements"] == pytest.approx((STEPS + 36 * STEPS + source) / (36 * STEPS))
    assert figures["ratios"]["sweep_vs_floor_elements"] == sw["sweep_vs_floor_elements"] <= 1.15
    assert any(line.startswith("  PASS sweep_vs_floor_elements") for line in figures["targets"])


def test_repeats_give_medians_and_spreads(figures):
    assert figures["config"]["repeats"] == 2
    sp = figures["spread"]
    for path in ("default", "reference", "floor", "warm"):
        lo, hi = sp["k"]["2"][path]["seconds_per_image"]
        assert lo <= figures["k"]["2"][path]["seconds_per_image"] <= hi
    lo, hi = sp["ratios"]["injection_overhead"]  # the spread of the paired repeats' ratios
    r = figures["ratios"]
    assert lo <= r["injection_overhead_paired"] <= hi
    assert "unet_calls" not in sp["k"]["2"]["default"]  # counts are the same every repeat: no spread
    assert r["injection_overhead"] == r["injection_overhead_paired"]  # the judged figure
    assert r["injection_overhead_fastest_calls"] is not None  # CPU: calls are timed


def test_combine_repeats_takes_medians_and_ranges():
    figs = [{"a": 1.0, "n": 5, "d": {"b": 10.0, "s": "x"}}, {"a": 3.0, "n": 5, "d": {"b": 30.0, "s": "x"}},
            {"a": 2.0, "n": 5, "d": {"b": None, "s": "x"}}]
    med, spread = combine_repeats(figs)
    assert med == {"a": 2.0, "n": 5, "d": {"b": 10.0, "s": "x"}}  # b: not a number every time -> the first
    assert spread == {"a": [1.0, 3.0]}
