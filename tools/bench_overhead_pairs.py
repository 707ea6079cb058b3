"""Paired measurement of the injection overhead where the machine's load drifts (a shared CPU).

`PYTHONPATH=. python tools/bench_overhead_pairs.py [--arch sdxl] [--rounds 3]`: builds the bench's
model once, then times the PnP sampling (the warm default path: K prompts, stored inversion, one
source branch) and the floor (stock attention processors, the same batches) alternately, A B A B ...,
so a change of load hits both alike. Prints each round and the total overhead.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from pnp_batch.bench.paths import Bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sdxl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    args = argparse.Namespace(arch=a.arch, device=a.device, dtype="auto", resolution=None, steps=None,
                              reference_inversion_steps=None, k=[a.k], sources=1, compile=False, json=None)
    b = Bench(args)
    with tempfile.TemporaryDirectory() as tmp:
        b.setup(tmp)
        b.warmup()
        _, sizes = b.run_default(a.k, warm=False)  # stores the inversion the warm path reads
        pnp, floor = [], []
        for r in range(a.rounds):
            pnp.append(b.run_default(a.k, warm=True)[0].sampling_seconds)
            floor.append(b.run_floor(a.k, sizes).sampling_seconds)
            print(f"round {r}: pnp {pnp[-1]:.1f} s, floor {floor[-1]:.1f} s, ratio {pnp[-1] / floor[-1]:.3f}",
                  flush=True)
    print(json.dumps({"pnp": pnp, "floor": floor, "overhead_total": sum(pnp) / sum(floor) - 1}))


if __name__ == "__main__":
    main()
