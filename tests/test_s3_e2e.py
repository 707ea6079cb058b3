"""`pnp-batch` end to end against a real S3 API (moto's server on loopback): manifest and images
read from a bucket, images, results, run summaries and features written to one; the feature store
reused from S3; status and validate on S3 URIs; a missing object fails its row; the secret key never
shows up anywhere a user can see it."""

from __future__ import annotations

import io
import json
import logging

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import S3_SECRET
from PIL import Image

from pnp_batch.cli import main
from pnp_batch.io import storage
from pnp_batch.io.results import latest_results, read_run_summaries, result_files

FAST = ["--pipeline", "tiny", "--set", "steps=4", "--set", "inversion_steps=4", "--set", "resolution=64",
        "--no-report"]


def _png(seed: int, w: int, h: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def _keys(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def _summary(client, bucket: str) -> dict:
    runs = [k for k in _keys(client, bucket, "out/runs/") if k.endswith(".json")]
    docs = [json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in runs]
    return max(docs, key=lambda d: d["started_at"])


@pytest.fixture
def s3_input(s3_server, s3_bucket, tiny_model_dir):
    """Two sources under s3://bucket/in/img/, a manifest (relative image paths) at in/manifest.parquet."""
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for i in range(2):
        client.put_object(Bucket=bucket, Key=f"in/img/s{i}.png", Body=_png(i, 64 + 16 * i, 64))
    rows = [
        {"id": f"s{i}-{j}", "image": f"img/s{i}.png", "source_prompt": "a photo", "target_prompt": p, "batch": "b1"}
        for i in range(2)
        for j, p in enumerate(["a photo of a fox", "a painting of a cat"])
    ]
    client.put_object(Bucket=bucket, Key="in/manifest.parquet", Body=_parquet(rows))
    return client, bucket, s3_bucket


def _assert_no_secret(*texts: str) -> None:
    for t in texts:
        assert S3_SECRET not in t


def test_s3_run_status_validate_and_feature_reuse(s3_input, capsys, caplog):
    client, bucket, root = s3_input
    caplog.set_level(logging.DEBUG)
    manifest, out = f"{root}/in/manifest.parquet", f"{root}/out"

    assert main(["run", manifest, "--out", out, *FAST]) == 0
    images = _keys(client, bucket, "out/images/")
    assert images == [f"out/images/s{i}-{j}.png" for i in range(2) for j in range(2)]
    for k in images:
        with Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read())) as im:
            assert im.format == "PNG"
    assert [k for k in _keys(client, bucket, "out/results/") if k.endswith(".parquet")]
    assert [k for k in _keys(client, bucket, "out/runs/") if k.endswith(".json")]
    assert _keys(client, bucket, "out/features/"), "features are stored under OUT/features on S3"

    # the results read as one dataset straight from S3
    fs, _ = storage.filesystem(out)
    paths = [storage.filesystem(f)[1] for f in result_files(out)]
    table = pads.dataset(paths, format="parquet", filesystem=fs).to_table()
    assert table.num_rows == 4 and set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("output").to_pylist()) == {f"{out}/images/s{i}-{j}.png" for i in range(2) for j in range(2)}
    assert set(table.column("image").to_pylist()) == {f"{root}/in/img/s{i}.png" for i in range(2)}
    s1 = _summary(client, bucket)
    assert s1["counts"]["ok"] == 4 and s1["stats"]["unet"]["inversions"] == 2

    # new target prompts for the same images: nothing is inverted again
    rows2 = [{"id": f"new{i}", "image": f"img/s{i}.png", "target_prompt": "a photo of a dog"} for i in range(2)]
    client.put_object(Bucket=bucket, Key="in/manifest2.parquet", Body=_parquet(rows2))
    assert main(["run", f"{root}/in/manifest2.parquet", "--out", out, *FAST]) == 0
    s2 = _summary(client, bucket)
    assert s2["counts"]["ok"] == 2
    assert s2["stats"]["unet"]["invert_calls"] == 0 and s2["stats"]["unet"]["cache_hits"] == 2
    assert len(read_run_summaries(out)) == 2

    capsys.readouterr()
    assert main(["status", out]) == 0
    status = capsys.readouterr().out
    assert "done: 6" in status and "failed: 0" in status
    assert main(["validate", manifest, "--check-images"]) == 0
    validated = capsys.readouterr()

    # the secret appears nowhere: output, logs, results, run summaries
    _assert_no_secret(status, validated.out, validated.err, caplog.text,
                      *(r.getMessage() for r in caplog.records))
    _assert_no_secret(json.dumps(latest_results(out).to_pylist(), default=str))
    for k in _keys(client, bucket, "out/runs/") + _keys(client, bucket, "out/results/"):
        assert S3_SECRET.encode() not in client.get_object(Bucket=bucket, Key=k)["Body"].read()


def test_s3_missing_object_fails_its_row(s3_input, capsys, caplog):
    client, bucket, root = s3_input
    rows = [
        {"id": "here", "image": "img/s0.png", "target_prompt": "a photo of a fox"},
        {"id": "gone", "image": "img/nope.png", "target_prompt": "a photo of a fox"},
    ]
    client.put_object(Bucket=bucket, Key="in/m-missing.parquet", Body=_parquet(rows))
    out = f"{root}/out"
    assert main(["run", f"{root}/in/m-missing.parquet", "--out", out, *FAST]) == 1
    res = {r["id"]: r for r in latest_results(out).to_pylist()}
    assert res["here"]["status"] == "ok"
    assert res["gone"]["status"] == "failed" and "not found" in res["gone"]["error"]
    assert "img/nope.png" in res["gone"]["error"]
    assert _keys(client, bucket, "out/images/") == ["out/images/here.png"]
    captured = capsys.readouterr()
    _assert_no_secret(captured.out, captured.err, caplog.text, json.dumps(list(res.values()), default=str))
