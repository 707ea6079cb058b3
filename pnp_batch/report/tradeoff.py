"""The trade-off plot (the paper's threshold study): mean structure distance (x, lower keeps more of the
source's structure) against mean CLIP score (y, higher follows the target prompt better), one point
per pipeline setting, its interquartile range as error bars, labelled by the setting.

`tradeoff_png` is pure (lists in, PNG bytes out); `tradeoff_points` builds its input from an output
folder: the latest ok results joined with their scores on (id, config_hash), grouped by the sweep's
`setting` column, else by config_hash.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pnp_batch.io.metrics import REGION_METRICS, ok_scores
from pnp_batch.io.results import latest_results

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingScores:
    """The scores of every scored row of one setting."""

    label: str
    structure: list[float]
    clip: list[float]
    background: dict[str, list[float]] = field(default_factory=dict)  # region edits: bg_psnr, bg_ssim, ...

    def summary(self) -> dict[str, float | int | str]:
        s, c = np.asarray(self.structure, float), np.asarray(self.clip, float)
        region = {f"{k}_mean": float(np.mean(v)) for k, v in self.background.items() if v}
        return {**region,
            "setting": self.label, "count": len(s),
            "structure_dist_mean": float(s.mean()), "structure_dist_q25": float(np.percentile(s, 25)),
            "structure_dist_q75": float(np.percentile(s, 75)),
            "clip_score_mean": float(c.mean()), "clip_score_q25": float(np.percentile(c, 25)),
            "clip_score_q75": float(np.percentile(c, 75)),
        }


def tradeoff_png(points: list[SettingScores], title: str = "PnP trade-off", dpi: int = 110) -> bytes:
    """The plot as PNG bytes: per setting a marker at (mean structure_dist, mean clip_score), error bars
    from the 25th to the 75th percentile on each axis, and the setting's label beside it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    pts = [p for p in points if p.structure and p.clip]
    if not pts:
        raise ValueError("no setting has scores to plot")
    fig = Figure(figsize=(12.0, 6.5), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if len(pts) <= 10 else "tab20"]
    for i, p in enumerate(pts):
        s = p.summary()
        x, y = s["structure_dist_mean"], s["clip_score_mean"]
        # the IQR around the mean; a skewed sample can put the mean outside it, then that side is 0
        xerr = [[max(x - s["structure_dist_q25"], 0.0)], [max(s["structure_dist_q75"] - x, 0.0)]]
        yerr = [[max(y - s["clip_score_q25"], 0.0)], [max(s["clip_score_q75"] - y, 0.0)]]
        color = cmap(i % cmap.N)
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=color, ecolor=color, elinewidth=1,
                    capsize=3, markersize=6, alpha=0.85, label=f"{i + 1}: {p.label} (n={s['count']})")
        # the number beside the point; the legend names the setting (full labels would overlap)
        ax.annotate(str(i + 1), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8,
                    color=color, fontweight="bold")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
              title="setting", title_fontsize=8, ncols=1 if len(pts) <= 24 else 2)
    ax.set_xlabel("structure_dist (mean; DINO self-similarity distance, lower = structure kept)")
    ax.set_ylabel("clip_score (mean; text fidelity, higher = closer to the target prompt)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def tradeoff_points(out_uri: str) -> list[SettingScores]:
    """The scored ok rows of an output, grouped by setting (the `setting` column of a sweep, else the
    config hash), in the order settings first appear by row id. Empty when nothing is scored."""
    scores = ok_scores(out_uri).select(["id", "config_hash", "clip_score", "structure_dist", *REGION_METRICS])
    if scores.num_rows == 0:
        return []
    results = latest_results(out_uri, ["status", "config_hash", "setting"])
    if results.num_rows == 0:
        return []
    n = results.num_rows
    setting = results.column("setting") if "setting" in results.column_names else pa.nulls(n, pa.string())
    res = pa.table({"id": results.column("id"), "config_hash": results.column("config_hash"),
                    "status": results.column("status"), "setting": setting.cast(pa.string())})
    joined = res.join(scores, keys=["id", "config_hash"], join_type="inner").sort_by("id")
    groups: dict[str, SettingScores] = {}
    region = [joined.column(m).to_pylist() for m in REGION_METRICS]
    for j, (rid, h, st, label, clip, struct) in enumerate(zip(*(joined.column(c).to_pylist() for c in (
            "id", "config_hash", "status", "setting", "clip_score", "structure_dist")))):
        if st != "ok" or clip is None or struct is None or np.isnan(clip) or np.isnan(struct):
            continue
        key = label if label else f"config {h}"
        g = groups.setdefault(key, SettingScores(key, [], []))
        g.structure.append(float(struct))
        g.clip.append(float(clip))
        for m, values in zip(REGION_METRICS, region):
            if values[j] is not None and not np.isnan(values[j]):
                g.background.setdefault(m, []).append(float(values[j]))
    return list(groups.values())
