"""The *-reference presets reproduce the authors' procedure (PNP_SPEC.md; their diffusers port).

The reference here is an independent, deliberately plain formulation of the authors' procedure:
diffusers' default einsum attention everywhere, injection by forward hooks on the `to_q`/`to_k`
linear layers and on `conv2` copying batch row 0 into rows 1 and 2, inversion saved at every
timestep, sampling on `[z_src(t), x, x]` with `[emb(""), emb(negative), emb(target)]`, decode with
`1/0.18215`, 8-bit by truncation (torchvision's ToPILImage). `pnp-batch run` must give the same
image to within one 8-bit level on average (the issue's acceptance bound); we measure ~0.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pnp_batch.cli import main

NEG = "ugly, blurry, black, low res, unrealistic"
STEPS, INV_STEPS, RES = 10, 100, 64


def reference_translate(model_dir: str, image: Image.Image, prompt: str) -> np.ndarray:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.set_attn_processor(AttnProcessor())
    sched = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")

    def emb(p: str) -> torch.Tensor:
        ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return te(ids.input_ids)[0]

    # 1. preprocessing: short side to RES (torchvision Resize semantics), [0,1] -> [-1,1], posterior mean
    w, h = image.size
    if w <= h:
        size = (RES, int(RES * h / w))
    else:
        size = (int(RES * w / h), RES)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).unsqueeze(0)
    with torch.no_grad():
        latent = vae.encode(2 * x - 1).latent_dist.mean * 0.18215
        # 2. inversion with the empty prompt, every latent kept
        cond = emb("")
        sched.set_timesteps(INV_STEPS)
        saved = {}
        ts = list(reversed(sched.timesteps))
        for i, t in enumerate(ts):
            a_t = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[ts[i - 1]] if i > 0 else sched.final_alpha_cumprod
            eps = unet(latent, t, encoder_hidden_states=cond).sample
            x0 = (latent - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
            latent = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
            saved[int(t)] = latent
        # 3. sampling with injection by hooks
        sched.set_timesteps(STEPS)
        state = {"qk": False, "conv": False}

        def copy_row0(flag):
            def hook(module, args, out):
                if state[flag]:
                    out[1:] = out[:1]
                return out

            return hook

        hooks = []
        for b, idx in {1: (1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}.items():
            for a in idx:
                attn1 = unet.up_blocks[b].attentions[a].transformer_blocks[0].attn1
                hooks += [attn1.to_q.register_forward_hook(copy_row0("qk")),
                          attn1.to_k.register_forward_hook(copy_row0("qk"))]
        hooks.append(unet.up_blocks[1].resnets[1].conv2.register_forward_hook(copy_row0("conv")))
        text = torch.cat([emb(""), emb(NEG), emb(prompt)])
        x = saved[int(sched.timesteps[0])]
        for i, t in enumerate(sched.timesteps):
            state["qk"] = i < int(STEPS * 0.5)
            state["conv"] = i < int(STEPS * 0.8)
            out = unet(torch.cat([saved[int(t)], x, x]), t, encoder_hidden_states=text).sample
            _, unc, con = out.chunk(3)
            x = sched.step(unc + 7.5 * (con - unc), t, x).prev_sample
        for hk in hooks:
            hk.remove()
        img = vae.decode(1 / 0.18215 * x).sample
        img = (img / 2 + 0.5).clamp(0, 1)
    return img[0].mul(255).byte().permute(1, 2, 0).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("size", [(64, 64), (96, 64), (64, 112)], ids=["square", "wide", "tall"])
def test_reference_preset_matches_authors_procedure(tmp_path, tiny_model_dir, size):
    rng = np.random.default_rng(sum(size))
    # a smooth image (like a photo), not white noise
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    src = Image.fromarray(small).resize(size, Image.BICUBIC)
    src.save(tmp_path / "src.png")
    prompt = "a photo of a fox"
    pq.write_table(pa.table({"id": ["r1"], "image": ["src.png"], "target_prompt": [prompt]}),
                   tmp_path / "m.parquet")
    out = tmp_path / "out"
    rc = main(["run", str(tmp_path / "m.parquet"), "--out", str(out), "--pipeline", "sd21-base-reference",
               "--set", f"model={tiny_model_dir}", "--set", f"steps={STEPS}", "--set",
               f"inversion_steps={INV_STEPS}", "--set", f"resolution={RES}", "--no-report"])
    assert rc == 0
    ours = np.asarray(Image.open(io.BytesIO((out / "images" / "r1.png").read_bytes())).convert("RGB"))
    theirs = reference_translate(str(tiny_model_dir), Image.open(tmp_path / "src.png").convert("RGB"), prompt)
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(int) - theirs.astype(int))
    assert diff.mean() <= 0.05, diff.mean()  # bound in the issue: 1.0; measured ~0
    assert diff.max() <= 2
