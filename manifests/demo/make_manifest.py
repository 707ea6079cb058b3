"""Build the demo manifest (manifest.csv and manifest.parquet) from the one list below.

    python manifests/demo/make_manifest.py            # rewrite both manifest files
    python manifests/demo/make_manifest.py --images   # also re-create images/ from scikit-image

Both files hold the same rows in the same order; tests/test_demo_manifest.py checks that they do.
Image paths are relative to this folder, so the manifest works wherever the folder is copied.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLUMNS = ("id", "image", "source_prompt", "target_prompt")
JPEG_QUALITY = 92
MAX_SHORT_SIDE = 512

# One entry per source image: (file stem, skimage.data function, source prompt, [(id suffix, target)]).
# Targets follow the kinds of edits the PnP paper shows: replace the object, change the style,
# change the season or the light, while the layout of the photograph stays.
SOURCES: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    (
        "chelsea",
        "chelsea",
        "a photo of a cat",
        [
            ("fox", "a photo of a fox"),
            ("watercolor", "a watercolor painting of a cat"),
            ("origami", "a photo of an origami cat made of folded paper"),
        ],
    ),
    (
        "coffee",
        "coffee",
        "a photo of a cup of coffee on a wooden table",
        [
            ("tea", "a photo of a cup of green tea on a wooden table"),
            ("oil-painting", "an oil painting of a cup of coffee on a wooden table"),
        ],
    ),
    (
        "astronaut",
        "astronaut",
        "a photo of a woman astronaut in an orange suit holding a helmet",
        [
            ("robot", "a photo of a robot in an orange suit holding a helmet"),
            ("pencil-sketch", "a pencil sketch of a woman astronaut holding a helmet"),
        ],
    ),
    (
        "rocket",
        "rocket",
        "a photo of a rocket on a launch pad at dusk",
        [
            ("daylight", "a photo of a rocket on a launch pad on a sunny day"),
            ("snow", "a photo of a rocket on a launch pad in winter, covered in snow"),
            ("lighthouse", "a photo of a lighthouse at dusk"),
        ],
    ),
    (
        "camera",
        "camera",
        "a black and white photo of a man filming with a camera on a tripod in a field",
        [
            ("night", "a photo of a man filming with a camera on a tripod in a field at night"),
            (
                "snow",
                "a photo of a man filming with a camera on a tripod in a field in winter, covered in snow",
            ),
        ],
    ),
]


def rows() -> list[dict[str, str]]:
    """The manifest rows, in order."""
    out = []
    for stem, _, source_prompt, targets in SOURCES:
        for suffix, target in targets:
            out.append(
                {
                    "id": f"{stem}-{suffix}",
                    "image": f"images/{stem}.jpg",
                    "source_prompt": source_prompt,
                    "target_prompt": target,
                }
            )
    return out


def write_csv(path: Path, data: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(data)


def write_parquet(path: Path, data: list[dict[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: pa.array([r[c] for r in data], type=pa.string()) for c in COLUMNS})
    pq.write_table(table, path)


def write_images(folder: Path) -> None:
    """Re-create images/ from the copies that ship inside scikit-image (no download)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for stem, func, _, _ in SOURCES:
        img = Image.fromarray(np.asarray(getattr(skimage.data, func)()))
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        short = min(img.size)
        if short > MAX_SHORT_SIDE:
            scale = MAX_SHORT_SIDE / short
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        img.save(folder / f"{stem}.jpg", "JPEG", quality=JPEG_QUALITY, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", action="store_true", help="also re-create images/ from scikit-image")
    args = parser.parse_args()
    if args.images:
        write_images(HERE / "images")
    data = rows()
    write_csv(HERE / "manifest.csv", data)
    write_parquet(HERE / "manifest.parquet", data)
    print(f"wrote {len(data)} rows to {HERE / 'manifest.csv'} and {HERE / 'manifest.parquet'}")


if __name__ == "__main__":
    main()
