"""GraphedUNet's bookkeeping (pnp_batch/pnp/graphs.py), with a stand-in for CUDA graph capture.

The stand-in "records" by running the call once and "replays" by running it again with the PnP
controller forced back to the state it had when recorded, reading the static input tensors: as a
CUDA graph does, which replays the recorded kernels whatever the controller says later. So a key
that missed part of the injection state, an input not copied into the static tensors, or an
output handed out without a copy all give a result different from the eager one. The real capture
runs in tests/test_gpu.py (CUDA only).
"""

from __future__ import annotations

import logging

import pytest
import torch

from pnp_batch.config import ConfigError, generation_timesteps, load_config
from pnp_batch.pnp.graphs import GraphedUNet, base_unet
from pnp_batch.pnp.injection import PnPInjector
from pnp_batch.pnp.inversion import ddim_invert
from pnp_batch.pnp.sampler import Target, pnp_sample

STEPS = 10


class ReplayBackend:
    def __init__(self, controller, fail: bool = False) -> None:
        self.controller = controller
        self.fail = fail
        self.captures = 0
        self.current_lane = 0

    def lane(self, sample) -> int:
        return self.current_lane

    def capture(self, fn, lane):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        c = self.controller
        out = fn()
        if c is None:  # stock processors: nothing to freeze
            return (lambda: out.copy_(fn())), out
        frozen = (c.conv_rows, c.attn_rows, c.has_source, c.record)

        def replay() -> None:
            now = (c.conv_rows, c.attn_rows, c.has_source, c.record)
            c.conv_rows, c.attn_rows, c.has_source, c.record = frozen
            try:
                out.copy_(fn())
            finally:
                c.conv_rows, c.attn_rows, c.has_source, c.record = now

        return replay, out


@pytest.fixture
def pnp_unet(tiny_models):
    injector = PnPInjector(tiny_models.unet)
    yield tiny_models.unet, injector
    injector.remove()


def _targets(embed, f_steps: list[int], attn_steps: list[int]) -> list[Target]:
    uncond = embed([""])[0]
    emb = embed([f"a photo of thing {j}" for j in range(len(f_steps))])
    return [Target(emb[j], uncond, 7.5, f, a) for j, (f, a) in enumerate(zip(f_steps, attn_steps))]


def _run(unet, injector, tiny_models, embed, z0s, targets, max_batch):
    """Invert each source, then sample its targets: (inverted latents, sampled latents) per source."""
    sc, cond = tiny_models.scheduler_config, embed([""])
    out = []
    for z0 in z0s:
        inv = ddim_invert(unet, sc, z0, cond, STEPS, generation_timesteps(STEPS))
        res = pnp_sample(unet, injector, sc, inv.latents, cond, targets, STEPS, max_batch)
        out.append((inv.latents, res.latents))
    return out


def _sources(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(1, 4, 16, 16, generator=g) for _ in range(n)]


def test_replays_equal_eager_and_graphs_are_reused_across_sources(pnp_unet, tiny_models, embed):
    unet, injector = pnp_unet
    targets = _targets(embed, [8, 8], [5, 5])
    eager = _run(unet, injector, tiny_models, embed, _sources(2), targets, 16)
    backend = ReplayBackend(injector.controller)
    graphed = GraphedUNet(unet, injector.controller, backend)
    got = _run(graphed, injector, tiny_models, embed, _sources(2), targets, 16)
    for (ie, se), (ig, sg) in zip(eager, got):
        assert torch.equal(ie, ig) and torch.equal(se, sg)
    # inversion (batch 1), then sampling batch 5: q/k + conv injected, conv only; batch 4 plain
    assert backend.captures == 4 and len(graphed.graphs) == 4
    assert graphed.eager_calls == 0 and graphed.replays == 2 * (STEPS + STEPS)  # every call, 2 sources
    assert base_unet(graphed) is unet


def test_split_batches_run_the_recording_calls_eagerly(pnp_unet, tiny_models, embed):
    unet, injector = pnp_unet
    targets = _targets(embed, [8, 8], [5, 5])
    eager = _run(unet, injector, tiny_models, embed, _sources(1), targets, 3)
    graphed = GraphedUNet(unet, injector.controller, ReplayBackend(injector.controller))
    got = _run(graphed, injector, tiny_models, embed, _sources(1), targets, 3)
    assert torch.equal(eager[0][1], got[0][1])
    # steps 0-7: [source + 2 targets] records, [2 targets] reads the recording: both eager;
    # steps 8-9: [3] + [1] without injection: recorded. Inversion: recorded.
    assert graphed.eager_calls == 8 * 2
    assert graphed.replays == STEPS + 2 * 2 and len(graphed.graphs) == 2  # [1] shares the inversion's graph


def test_per_row_thresholds_key_graphs_by_stable_index_tensors(pnp_unet, tiny_models, embed):
    unet, injector = pnp_unet
    targets = _targets(embed, [8, 3], [5, 2])  # rows injected differ by step: index tensors, not slices
    eager = _run(unet, injector, tiny_models, embed, _sources(2), targets, 16)
    backend = ReplayBackend(injector.controller)
    graphed = GraphedUNet(unet, injector.controller, backend)
    got = _run(graphed, injector, tiny_models, embed, _sources(2), targets, 16)
    for (_, se), (_, sg) in zip(eager, got):
        assert torch.equal(se, sg)
    first = backend.captures
    _run(graphed, injector, tiny_models, embed, _sources(1), targets, 16)
    assert backend.captures == first  # the second and third sources record nothing new


def test_processor_sets_keep_their_graphs(tiny_models, embed):
    """As the bench's floor does: PnP processors off, stock ones on (their own graphs), then a new
    injector: the PnP graphs recorded before serve again, nothing is recorded twice."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet, sc, cond = tiny_models.unet, tiny_models.scheduler_config, embed([""])
    targets = _targets(embed, [8, 8], [5, 5])
    injector = PnPInjector(unet)
    backend = ReplayBackend(injector.controller)
    graphed = GraphedUNet(unet, injector.controller, backend)
    eager = _run(unet, injector, tiny_models, embed, _sources(1), targets, 16)
    _run(graphed, injector, tiny_models, embed, _sources(1), targets, 16)
    pnp_graphs = backend.captures
    injector.remove()
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        graphed.use("stock", None)
        backend.controller = None
        z0 = _sources(1)[0]
        plain = ddim_invert(unet, sc, z0, cond, STEPS, generation_timesteps(STEPS)).latents
        assert torch.equal(plain, ddim_invert(graphed, sc, z0, cond, STEPS, generation_timesteps(STEPS)).latents)
        assert backend.captures == pnp_graphs + 1 and graphed.recorded == pnp_graphs + 1
        injector = PnPInjector(unet)
        graphed.use("pnp", injector.controller)
        backend.controller = injector.controller
        again = _run(graphed, injector, tiny_models, embed, _sources(1), targets, 16)
    finally:
        injector.remove()
    assert backend.captures == pnp_graphs + 1  # nothing recorded again
    assert torch.equal(eager[0][1], again[0][1])


def test_graph_count_is_bounded(pnp_unet, tiny_models, embed):
    unet, injector = pnp_unet
    backend = ReplayBackend(injector.controller)
    graphed = GraphedUNet(unet, injector.controller, backend, max_graphs=2)
    eager = _run(unet, injector, tiny_models, embed, _sources(1), _targets(embed, [8, 8], [5, 5]), 16)
    got = _run(graphed, injector, tiny_models, embed, _sources(1), _targets(embed, [8, 8], [5, 5]), 16)
    assert torch.equal(eager[0][1], got[0][1])
    assert graphed.recorded == 2 and backend.captures == 4  # 4 shapes/states, the oldest dropped
    graphed.use("stock", None)  # a set with nothing yet: the other set gives way
    backend.controller = None
    z0 = _sources(1)[0]
    ddim_invert(graphed, tiny_models.scheduler_config, z0, embed([""]), 2, generation_timesteps(2))
    assert graphed.recorded == 2 and len(graphed.graphs) == 1


def test_capture_failure_falls_back_to_eager_once(pnp_unet, tiny_models, embed, caplog):
    unet, injector = pnp_unet
    targets = _targets(embed, [8], [5])
    eager = _run(unet, injector, tiny_models, embed, _sources(1), targets, 16)
    graphed = GraphedUNet(unet, injector.controller, ReplayBackend(injector.controller, fail=True))
    with caplog.at_level(logging.WARNING, logger="pnp_batch.pnp.graphs"):
        got = _run(graphed, injector, tiny_models, embed, _sources(1), targets, 16)
    assert torch.equal(eager[0][1], got[0][1])
    assert graphed.failed and graphed.replays == 0 and graphed.eager_calls == 2 * STEPS
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1


def test_cuda_graphs_key(tiny_model_dir, tmp_path):
    from pnp_batch.translate.translator import Translator

    with pytest.raises(ConfigError, match="alternatives"):
        load_config("tiny", {"model": str(tiny_model_dir), "cuda_graphs": True, "compile": True})
    cfg = load_config("tiny", {"model": str(tiny_model_dir), "cuda_graphs": True, "device": "cpu"})
    assert cfg.hash() == cfg.replace(cuda_graphs=False).hash()  # it does not change the output
    tr = Translator(cfg, str(tmp_path), worker="test")
    assert not isinstance(tr.models.unet, GraphedUNet)  # CPU: eager
    # The default, 'auto': on for CUDA unless compile is set (so compile alone is no conflict); eager here.
    auto = load_config("tiny", {"model": str(tiny_model_dir), "device": "cpu"})
    assert auto.cuda_graphs == "auto" and auto.hash() == cfg.hash()
    assert not isinstance(Translator(auto, str(tmp_path), worker="test").models.unet, GraphedUNet)
    assert load_config("tiny", {"model": str(tiny_model_dir), "compile": True}).cuda_graphs == "auto"
    with pytest.raises(ConfigError, match="cuda_graphs='sometimes'"):
        load_config("tiny", {"model": str(tiny_model_dir), "cuda_graphs": "sometimes"})


def test_graphs_are_kept_per_stream(pnp_unet, tiny_models, embed):
    """Inversions side by side on CUDA streams (ddim_invert_many) may replay at the same time, so each
    stream records its own graph (own static tensors and memory pool) even for the same shape."""
    from pnp_batch.pnp.inversion import ddim_invert_many

    unet, injector = pnp_unet
    sc, cond, keep = tiny_models.scheduler_config, embed([""]), generation_timesteps(STEPS)
    backend = ReplayBackend(injector.controller)
    graphed = GraphedUNet(unet, injector.controller, backend)

    class Lanes(torch.nn.Module):  # what torch.cuda.stream(s) does for CudaGraphBackend.lane: calls alternate
        def __init__(self) -> None:
            super().__init__()
            self.graphed, self.calls = graphed, 0

        @property
        def dtype(self):
            return graphed.dtype

        def forward(self, *args, **kwargs):
            backend.current_lane = self.calls % 2
            self.calls += 1
            return self.graphed(*args, **kwargs)

    z0s = _sources(2)
    got = ddim_invert_many(Lanes(), sc, z0s, cond, STEPS, keep)
    assert backend.captures == 2 and len(graphed.graphs) == 2 and graphed.replays == 2 * STEPS
    for z0, out in zip(z0s, got):
        assert torch.equal(out.latents, ddim_invert(unet, sc, z0, cond, STEPS, keep).latents)
