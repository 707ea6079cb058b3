"""Which groups share a pack of sources (pipeline key `sources_per_batch`; translate/packs.py does the
work). No torch here: the planner (engines/plan.py) runs in the driver, which loads no model.

The packs are a function of the manifest and the config alone: the groups of each window of rows the
planner reads, cut into consecutive packs of N in first-seen order, done or not. A pack with a row to
do is handed out whole, its done rows as companions, so a resumed or Ray-distributed run forms the
same packs as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

from pnp_batch.io.rows import Row


def pack_size(cfg) -> int:
    """N, the sources per pack. `auto` is a function of the config alone (the packs must be the same on
    every worker and after a resume, so never of a device's free memory): 4 up to 512 px (latents of
    64x64 or less), 2 up to 768 px, else 1 (SDXL at 1024 px fills a GPU with one source's K targets)."""
    n = cfg.sources_per_batch
    if n != "auto":
        return int(n)
    side = cfg.resolution // 8
    return 4 if side <= 64 else 2 if side <= 96 else 1


class Pack(list):
    """The groups of one pack, in manifest order: one window for the engines (plan.windows)."""


def window_packs(groups: list[list[Row]], n: int, overwrite: bool,
                 counts: dict[str, int] | None) -> Iterator[Pack]:
    """The packs of one planner window that have a row to do (every pack with --overwrite). A group
    whose rows are all done stays in its pack as companions."""
    for start in range(0, len(groups), n):
        pack = Pack(groups[start : start + n])
        if overwrite:
            yield pack
        elif any(not r.companion for g in pack for r in g):
            if counts is not None:
                counts["companions"] = counts.get("companions", 0) + sum(r.companion for g in pack for r in g)
            yield pack
