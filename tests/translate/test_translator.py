"""Translator: sources of one size are inverted together; results equal one-at-a-time inversion."""

from __future__ import annotations

import hashlib
import io
import shutil

import numpy as np
import torch
from PIL import Image

from pnp_batch.config import load_config
from pnp_batch.io.rows import Row
from pnp_batch.translate import sources as worker_module
from pnp_batch.translate.translator import Translator

STEPS = 4


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _translator(tmp_path, tiny_models, name: str, inversion_batch: int, inversion_streams: int = 1) -> Translator:
    cfg = load_config("tiny", {"steps": STEPS, "inversion_steps": STEPS, "resolution": 64})
    tr = Translator(cfg, str(tmp_path / name), models=tiny_models, worker=name)
    tr.inversion_batch = inversion_batch
    tr.inversion_streams = inversion_streams
    return tr


def test_same_size_sources_share_inversion_calls(tmp_path, tiny_models):
    sources = [(_png(0, (64, 64)), ""), (_png(1, (64, 64)), ""), (_png(2, (96, 64)), ""), (b"not an image", "")]
    one = _translator(tmp_path, tiny_models, "one", 1)
    many = _translator(tmp_path, tiny_models, "many", 4)
    try:
        a = one.source_features_many(sources)
        b = many.source_features_many(sources)
    finally:  # last installed, first removed: each gives back the processors it found
        many.injector.remove()
        one.injector.remove()
    assert isinstance(a[3], Exception) and isinstance(b[3], Exception)  # the bad source fails alone
    assert one.counters.invert_calls == 3 * STEPS and one.counters.invert_elements == 3 * STEPS
    # the two 64x64 sources share one UNet call per step; the 96x64 one has its own; every call is
    # padded to the 4 rows of inversion_batch
    assert many.counters.invert_calls == 2 * STEPS and many.counters.invert_elements == 2 * 4 * STEPS
    assert many.counters.inversions == one.counters.inversions == 3
    for x, y in zip(a[:3], b[:3]):
        assert x[0].shape == y[0].shape and x[1] == y[1] and not x[2] and not y[2]
        assert torch.allclose(x[0], y[0], atol=1e-4)  # batch composition changes float rounding only


def test_a_source_gets_the_same_latents_whatever_else_shares_its_inversion_call(tmp_path, tiny_models):
    """inversion_batch 4: A alone, A with one other source, A with three: every call is 4 rows, so A
    (first in each) gets the same bits. Unpadded, a batch of 1 and a batch of 2 round differently here."""
    a, others = _png(10, (64, 64)), [_png(11 + i, (64, 64)) for i in range(3)]
    tr = _translator(tmp_path, tiny_models, "pad", 4)
    got = []
    try:
        for n in (0, 1, 3):
            got.append(tr.source_features_many([(a, ""), *((o, "") for o in others[:n])])[0])
            tr.flush()
            shutil.rmtree(tmp_path / "pad" / "features")  # the next call inverts A again
    finally:
        tr.injector.remove()
    assert [g[2] for g in got] == [False] * 3  # none came from the store
    assert tr.counters.invert_calls == 3 * STEPS and tr.counters.invert_elements == 3 * 4 * STEPS
    assert tr.counters.inversions == 1 + 2 + 4
    for g in got[1:]:
        assert torch.equal(got[0][0], g[0]), (got[0][0] - g[0]).abs().max()


def test_inversion_streams_invert_every_source_as_if_alone(tmp_path, tiny_models):
    """inversion_streams 2 (CUDA streams side by side; here the calls take turns): the same UNet calls
    as one source at a time, and the same bits, with or without inversion_batch."""
    sources = [(_png(20 + i, (64, 64)), "") for i in range(3)] + [(_png(23, (96, 64)), "")]
    got = {}
    for batch, streams in ((1, 1), (1, 2), (2, 1), (2, 2)):
        tr = _translator(tmp_path, tiny_models, f"b{batch}s{streams}", batch, streams)
        try:
            got[batch, streams] = tr.source_features_many(sources)
        finally:
            tr.injector.remove()
        calls = 4 * STEPS if batch == 1 else 3 * STEPS  # 64x64: [2 sources] + [1 + padding]; 96x64 alone
        assert (tr.counters.invert_calls, tr.counters.invert_elements) == (calls, batch * calls)
        assert tr.counters.inversions == 4 and tr.window == batch * streams
    for batch in (1, 2):
        for x, y in zip(got[batch, 1], got[batch, 2]):
            assert x[1] == y[1] and torch.equal(x[0], y[0])


def test_the_local_engine_hands_out_windows_of_inversion_batch_times_streams(tmp_path, monkeypatch):
    from pnp_batch.cli import main

    (tmp_path / "in").mkdir()
    lines = ["id,image,source_prompt,target_prompt"]
    for s in range(3):
        (tmp_path / "in" / f"src{s}.png").write_bytes(_png(30 + s, (64, 64)))
        lines += [f"s{s}-t{k},src{s}.png,a photo,a painting {k}" for k in range(2)]
    (tmp_path / "in" / "m.csv").write_text("\n".join(lines) + "\n")
    windows = []
    start_many = Translator.start_many

    def recording(self, groups, *args, **kwargs):
        windows.append(len(groups))
        return start_many(self, groups, *args, **kwargs)

    monkeypatch.setattr(Translator, "start_many", recording)
    fast = ["--pipeline", "tiny", "--set", f"steps={STEPS}", "--set", f"inversion_steps={STEPS}",
            "--set", "resolution=64"]
    for name, streams in (("one", 1), ("two", 2)):
        args = ["run", str(tmp_path / "in" / "m.csv"), "--out", str(tmp_path / name), *fast]
        assert main([*args, "--set", f"inversion_streams={streams}"]) == 0
    assert windows == [1, 1, 1, 2, 1]
    names = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "two" / "images").iterdir())
    for n in names:
        assert (tmp_path / "one" / "images" / n).read_bytes() == (tmp_path / "two" / "images" / n).read_bytes()


def test_process_many_returns_one_record_list_per_group(tmp_path, tiny_models):
    tr = _translator(tmp_path, tiny_models, "pm", 2)
    data = _png(3, (64, 64))

    def row(i: int, prompt: str, image_bytes: bytes | None = data, error: str | None = None) -> Row:
        return Row(index=i, id=f"r{i}", image=None, image_bytes=image_bytes, source_prompt="", target_prompt=prompt,
                   error=error)

    groups = [[row(0, "a fox"), row(1, "a dog")], [row(2, "x", image_bytes=b"broken")], [row(3, "", error="empty")]]
    try:
        out = tr.process_many(groups)
    finally:
        tr.injector.remove()
    assert [[r["id"] for r in g] for g in out] == [["r0", "r1"], ["r2"], ["r3"]]
    assert [r["status"] for r in out[0]] == ["ok", "ok"] and out[1][0]["status"] == "failed"
    assert "not an image" in out[1][0]["error"] and out[2][0]["error"] == "empty"
    assert (tmp_path / "pm" / "images" / "r0.png").is_file()


def test_start_many_returns_before_images_are_written(tmp_path, tiny_models, monkeypatch):
    """The GPU work is done when start_many returns; encoding and writing go on in threads, and a
    record says ok only once its image is written (a failed write fails that row alone)."""
    import threading
    from concurrent.futures import Future

    from pnp_batch.io.records import resolve
    from pnp_batch.translate import translator as worker

    go = threading.Event()
    real = worker.storage.write_bytes_atomic

    def gated_write(uri: str, data: bytes) -> None:
        if "/images/" not in uri:  # the feature store writes through here too, synchronously
            return real(uri, data)
        assert go.wait(60), "the test never released the writes"
        if uri.endswith("r1.png"):
            raise OSError("disk full")
        real(uri, data)

    monkeypatch.setattr(worker.storage, "write_bytes_atomic", gated_write)
    tr = _translator(tmp_path, tiny_models, "async", 1)
    rows = [Row(index=i, id=f"r{i}", image=None, image_bytes=_png(5, (64, 64)), source_prompt="", target_prompt=p)
            for i, p in enumerate(["a fox", "a dog"])]
    try:
        started = tr.start_many([rows])
        assert all(isinstance(r, Future) and not r.done() for r in started[0])
        assert not (tmp_path / "async" / "images" / "r0.png").exists()
        go.set()
        recs = resolve(started[0])
    finally:
        tr.close()
        tr.injector.remove()
    assert [r["status"] for r in recs] == ["ok", "failed"]
    assert (tmp_path / "async" / "images" / "r0.png").is_file() and "disk full" in recs[1]["error"]
    assert recs[0]["output"].endswith("r0.png") and recs[0]["width"] == 64


def test_local_engine_writes_one_window_while_the_next_is_on_the_gpu():
    from concurrent.futures import Future

    from pnp_batch.engines.local import LocalBackend

    events: list[str] = []

    class FakeTranslator:
        window = 1

        def prefetch(self, group):
            return group

        def start_many(self, window):
            events.append("start " + window[0][0].id)
            fut: Future = Future()
            fut.set_result({"id": window[0][0].id, "status": "ok"})
            return [[fut]]

    backend = LocalBackend()
    backend.translator = FakeTranslator()
    groups = [[Row(index=i, id=f"g{i}", image=None, image_bytes=b"x", source_prompt="", target_prompt="t")]
              for i in range(3)]
    for recs in backend.map_groups(iter(groups)):
        events.append("yield " + recs[0]["id"])
    assert events == ["start g0", "start g1", "yield g0", "start g2", "yield g1", "yield g2"]


def test_feature_writes_run_behind_and_a_failed_one_fails_no_row(tmp_path, tiny_models, monkeypatch, caplog):
    """Features are written to the store in a writer thread; until then a second request for the
    same source is served from memory (no second inversion). A failed write is logged, the rows are
    ok, and the next translator inverts that source again."""
    import logging
    import threading

    go = threading.Event()
    tr = _translator(tmp_path, tiny_models, "feat", 1)
    real_put = tr.features.put
    calls = []

    def gated_put(key, latents, meta):
        calls.append(key)
        assert go.wait(60)
        raise OSError("store unavailable")

    monkeypatch.setattr(tr.features, "put", gated_put)
    src = [(_png(9, (64, 64)), "")]
    try:
        first = tr.source_features_many(src)
        second = tr.source_features_many(src)  # the write is still blocked: served from memory
        assert not first[0][2] and second[0][2] and torch.equal(first[0][0], second[0][0])
        assert tr.counters.inversions == 1 and tr.counters.invert_calls == STEPS and len(calls) == 1
        with caplog.at_level(logging.WARNING, logger="pnp_batch.translate.translator"):
            go.set()
            tr.flush()
        assert any("inverted again" in r.message for r in caplog.records)
        rows = [Row(index=0, id="f0", image=None, image_bytes=src[0][0], source_prompt="", target_prompt="a fox")]
        assert tr.process_many([rows])[0][0]["status"] == "ok"  # the failed write failed no row
        assert tr.counters.inversions == 2  # nothing was stored: inverted again
        monkeypatch.setattr(tr.features, "put", real_put)
        tr.process_many([rows])
        tr.flush()
    finally:
        tr.close()
        tr.injector.remove()
    fresh = _translator(tmp_path, tiny_models, "feat", 1)
    try:
        assert fresh.source_features_many(src)[0][2]  # stored now: a hit from the store
    finally:
        fresh.injector.remove()


def test_prefetch_reads_source_bytes_and_stored_features_ahead(tmp_path, tiny_models, monkeypatch):
    png = _png(11, (64, 64))
    (tmp_path / "src.png").write_bytes(png)
    row = Row(index=0, id="p0", image=str(tmp_path / "src.png"), image_bytes=None, source_prompt="",
              target_prompt="a fox")
    tr = _translator(tmp_path, tiny_models, "pre", 1)
    try:
        cold = tr.prefetch([row])
        assert cold[0].image_bytes == png and not tr._prefetched  # nothing stored yet
        tr.process_many([cold])
        tr.flush()
        warm = tr.prefetch([row])
        assert len(tr._prefetched) == 1

        def store_gone(key):
            raise AssertionError("the store was read again")

        monkeypatch.setattr(tr.features, "get", store_gone)
        hashed = []
        real_sha256 = hashlib.sha256
        monkeypatch.setattr(worker_module.hashlib, "sha256", lambda b=b"": hashed.append(b) or real_sha256(b))
        feats = tr.source_features_many([(warm[0].image_bytes, "")])
        assert feats[0][2] and not tr._prefetched  # a hit, served from the read-ahead, then dropped
        assert png not in hashed and not tr._digests  # hashed once, by prefetch, not again here
        assert feats[0][1] == tr._key(real_sha256(png).hexdigest(), "")
        bad = Row(index=1, id="p1", image=str(tmp_path / "missing.png"), image_bytes=None, source_prompt="",
                  target_prompt="x")
        assert tr.prefetch([bad]) == [bad]  # left for the translation to fail and record
    finally:
        tr.close()
        tr.injector.remove()


def test_auto_batch_size_is_the_devices_own_not_what_happens_to_be_free():
    """batch_size auto on CUDA: from total - held (the same for every worker on the same hardware and
    model), so start-up noise in free memory does not change how groups are split; only a device
    mostly held by other processes lowers it, with a note."""
    from pnp_batch.translate.sizing import auto_batch_size

    gib = 2**30
    latent = (1024 // 8) ** 2  # SD at 1024 px in fp16: ~0.46 GiB per batch element
    per = latent * 15_000 * 2
    total, held = 24 * gib, 3 * gib
    own = int(21 * gib * 0.7 // per)
    assert 3 < own < 64
    # a dedicated device: whatever the CUDA context and caches leave free at start-up, the same answer
    for free in (int(20.9 * gib), int(20.2 * gib), int(17.5 * gib)):
        assert auto_batch_size(total, held, free, latent, 2) == (own, None)
    # another process holds 10 GiB: the free memory decides, and says so
    n, note = auto_batch_size(total, held, 11 * gib, latent, 2)
    assert n == int(11 * gib * 0.7 // per) < own and "other processes hold 10.0 GiB" in note
    # bounds: at least 3 (source + one target with guidance), at most 64
    assert auto_batch_size(80 * gib, held, 77 * gib, (512 // 8) ** 2, 2) == (64, None)
    assert auto_batch_size(4 * gib, held, gib, latent, 2)[0] == 3


def test_a_corrupt_stored_inversion_warns_once_and_is_recomputed_and_rewritten(tmp_path, tiny_models, caplog):
    """prefetch reads the stored features ahead and source_features_many uses what it found: a
    truncated object is read and verified once, so its warning comes once for one occurrence."""
    import logging

    from pnp_batch.io.features import FeatureStore

    png = _png(12, (64, 64))
    (tmp_path / "src.png").write_bytes(png)
    row = Row(index=0, id="c0", image=str(tmp_path / "src.png"), image_bytes=None, source_prompt="",
              target_prompt="a fox")
    tr = _translator(tmp_path, tiny_models, "corrupt", 1)
    try:
        tr.process_many([tr.prefetch([row])])
        tr.flush()
        key = tr._key(hashlib.sha256(png).hexdigest(), "")
        store = FeatureStore(tr.features.root_uri)
        good, _ = store.get(key)
        path = tmp_path / "corrupt" / "features" / key[:2] / f"{key}.safetensors"
        path.write_bytes(path.read_bytes()[:-100])  # truncated
        before = tr.counters.inversions
        with caplog.at_level(logging.WARNING, logger="pnp_batch.io.features"):
            records = tr.process_many([tr.prefetch([row])])
            tr.flush()
        warned = [r for r in caplog.records if "corrupt feature object" in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in warned]
        assert records[0][0]["status"] == "ok" and records[0][0]["feature_cache_hit"] is False
        assert tr.counters.inversions == before + 1  # recomputed
        again, _ = store.get(key)  # rewritten whole: reads clean, same latents
        assert torch.equal(again, good)
    finally:
        tr.close()
        tr.injector.remove()
