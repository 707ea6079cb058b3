"""`pnp-batch manifest from-pie-bench`: PIE-Bench's annotation file as a manifest with masks (docs/masks.md).

PIE-Bench (Ju et al., ICLR 2024) annotates 700 images in one JSON object, key -> entry, with the fields
`image_path` (under the benchmark's image folder), `original_prompt` and `editing_prompt` (the edited
words in `[]`), `editing_instruction`, `editing_type_id`, `blended_word` and `mask`: run-length pairs
(start, length) over the flattened 512x512 image, row by row. The benchmark's own decoder also marks the
image's one-pixel frame as edited (to forgive annotations at the border); so does this one, so
background metrics are taken over the same pixels. The data set itself is not redistributed here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pnp_batch.errors import UsageError

SIZE = 512  # PIE-Bench's masks are over 512x512 images
PASS_THROUGH = ("pie_id", "editing_type_id", "editing_instruction", "blended_word", "original_prompt",
                "editing_prompt", "image_path")


def add_manifest_args(sub: Any) -> None:
    m = sub.add_parser("manifest", help="make a manifest from another format (PIE-Bench)")
    msub = m.add_subparsers(dest="manifest_verb", required=True)
    p = msub.add_parser("from-pie-bench", help="PIE-Bench's mapping_file.json -> a manifest with mask_bytes")
    p.add_argument("mapping", help="PIE-Bench's annotation file (mapping_file.json)")
    p.add_argument("--images", required=True, help="the folder PIE-Bench's image_path values are relative to")
    p.add_argument("--out", required=True, help="the manifest to write (.parquet)")
    p.add_argument("--no-frame", action="store_true",
                   help="do not mark the one-pixel frame as edited (PIE-Bench's decoder does)")


def decode_rle(pairs: list[int], size: int = SIZE, frame: bool = True) -> np.ndarray:
    """A bool (size, size) mask from (start, length) pairs over the row-major flattened image."""
    if len(pairs) % 2:
        raise ValueError(f"mask has an odd number of values ({len(pairs)}): not (start, length) pairs")
    n = size * size
    flat = np.zeros(n, dtype=bool)
    for start, length in zip(pairs[0::2], pairs[1::2]):
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start >= n:
            raise ValueError(f"mask run ({start}, {length}) lies outside a {size}x{size} image")
        flat[start : min(n, start + length)] = True
    mask = flat.reshape(size, size)
    if frame:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def plain_prompt(text: str) -> str:
    """A PIE-Bench prompt without the brackets around its edited words."""
    return re.sub(r"\s+", " ", text.replace("[", "").replace("]", "")).strip()


def convert(mapping: str, images: str, out: str, frame: bool = True) -> tuple[int, list[str]]:
    """Write the manifest; (rows written, problems of the entries left out)."""
    try:
        with open(mapping, encoding="utf-8") as fh:
            entries = json.load(fh)
    except (OSError, ValueError) as e:
        raise UsageError(f"{mapping}: cannot read PIE-Bench's annotation file: {e}") from None
    if not isinstance(entries, dict):
        raise UsageError(f"{mapping}: expected a JSON object of key -> entry")
    base = os.path.dirname(os.path.abspath(out))
    root = os.path.abspath(images)
    inside = os.path.commonpath([base, root]) == base
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for key in sorted(entries):
        e = entries[key]
        try:
            path = os.path.join(root, e["image_path"])
            rows.append({
                "id": f"pie-{key}",
                "image": os.path.relpath(path, base) if inside else path,
                "source_prompt": plain_prompt(e["original_prompt"]),
                "target_prompt": plain_prompt(e["editing_prompt"]),
                "mask_bytes": _png(decode_rle(list(e["mask"]), frame=frame)),
                "pie_id": str(key),
                "editing_type_id": str(e.get("editing_type_id", "")),
                "editing_instruction": e.get("editing_instruction", ""),
                "blended_word": e.get("blended_word", ""),
                "original_prompt": e["original_prompt"],
                "editing_prompt": e["editing_prompt"],
                "image_path": e["image_path"],
            })
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"entry {key}: {type(err).__name__}: {err}")
    if not rows:
        raise UsageError(f"{mapping}: no usable entry" + (f" ({problems[0]})" if problems else ""))
    schema = pa.schema([("id", pa.string()), ("image", pa.string()), ("source_prompt", pa.string()),
                        ("target_prompt", pa.string()), ("mask_bytes", pa.binary()),
                        *((c, pa.string()) for c in PASS_THROUGH)])
    os.makedirs(base, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
    return len(rows), problems


def cmd_manifest(a: argparse.Namespace) -> int:
    n, problems = convert(a.mapping, a.images, a.out, frame=not a.no_frame)
    for p in problems:
        print(f"pnp-batch manifest: skipped {p}")
    print(f"wrote {a.out}: {n} rows with masks ({len(problems)} entries skipped); run it with "
          f"--set mask_mode=manifest" + ("" if os.path.commonpath([os.path.dirname(os.path.abspath(a.out)),
                                                                    os.path.abspath(a.images)])
                                          == os.path.dirname(os.path.abspath(a.out))
                                          else f" --allow-uri {os.path.abspath(a.images).rstrip('/')}/ (the "
                                          "images lie outside the manifest's folder)"))
    return 0 if n else 2
