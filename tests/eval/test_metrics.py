"""The scores against their definitions, recomputed here by hand on the random-weight metric models.

The references below use the models' weights directly (towers, projections, the ViT's layers and
the key projection's weight), plain PIL / torch operations and the constants of the definitions, not
the code under test.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pnp_batch.eval.metrics import clip_score, structure_dist, structure_size

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# CLIP score by hand


def _clip_pixels(image: Image.Image) -> torch.Tensor:
    """CLIP's preprocessing: short side 224 (bicubic), centre crop 224, /255, CLIP mean/std -> [1, 3, 224, 224]."""
    w, h = image.size
    scale = 224 / min(w, h)
    new_w, new_h = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
    assert abs(new_w - w * scale) < 1 and abs(new_h - h * scale) < 1
    resized = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    arr = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def _clip_text_ids(tokenizer, prompt: str) -> torch.Tensor:
    """BOS + at most 75 tokens + EOS (77 in all), cut by hand from the untruncated tokenization."""
    ids = tokenizer(prompt, truncation=False)["input_ids"]
    body = ids[1:-1][:75]
    return torch.tensor([[tokenizer.bos_token_id, *body, tokenizer.eos_token_id]])


def _hand_clip_cosine(models, image: Image.Image, prompt: str) -> float:
    clip = models.clip
    with torch.no_grad():
        vision = clip.vision_model(pixel_values=_clip_pixels(image))
        image_emb = clip.visual_projection(vision.pooler_output)[0]
        ids = _clip_text_ids(models.clip_processor.tokenizer, prompt)
        text = clip.text_model(input_ids=ids)
        eos_at = int((ids[0] == models.clip_processor.tokenizer.eos_token_id).nonzero()[0])
        text_emb = clip.text_projection(text.last_hidden_state[0, eos_at])
    return float(image_emb @ text_emb / (image_emb.norm() * text_emb.norm()))


PROMPTS = ["a photo of a cat", "a watercolor painting of a red house", "a dog on a beach at night", "", "a cat"]


def test_clip_score_matches_the_definition(metric_models, noise_image):
    images = [noise_image(64, 64, 1), noise_image(96, 64, 2), noise_image(50, 90, 3), noise_image(64, 64, 4),
              noise_image(300, 200, 5)]
    scores = clip_score(metric_models, images, PROMPTS)
    cosines = [_hand_clip_cosine(metric_models, img, p) for img, p in zip(images, PROMPTS)]
    assert scores == pytest.approx([100 * max(c, 0.0) for c in cosines], abs=1e-3)
    assert any(c > 0.05 for c in cosines), "the check needs at least one clearly positive cosine"


def test_clip_score_clamps_negative_cosines_to_zero(metric_models, noise_image):
    """With the text projection negated every cosine flips sign: positive scores become 0 and back."""
    images = [noise_image(64, 64, s) for s in range(len(PROMPTS))]
    flipped = copy.deepcopy(metric_models)
    with torch.no_grad():
        flipped.clip.text_projection.weight.neg_()
    scores = clip_score(metric_models, images, PROMPTS)
    negated = clip_score(flipped, images, PROMPTS)
    cosines = [_hand_clip_cosine(metric_models, img, p) for img, p in zip(images, PROMPTS)]
    assert negated == pytest.approx([100 * max(-c, 0.0) for c in cosines], abs=1e-3)
    for s, n in zip(scores, negated):
        assert 0.0 <= s <= 100.0 and 0.0 <= n <= 100.0
        assert s == 0.0 or n == 0.0


def test_clip_score_cuts_prompts_at_77_tokens(metric_models, noise_image):
    """Only the first 77 tokens count: a different tail changes nothing, and nothing fails."""
    long = " ".join(["a photo of a red house"] * 40)  # far more than 77 tokens
    image = noise_image(64, 64)
    tails = clip_score(metric_models, [image, image], [long + " with a cat", long + " under snow at night"])
    assert tails[0] == tails[1]
    assert tails[0] == pytest.approx(100 * max(_hand_clip_cosine(metric_models, image, long), 0.0), abs=1e-3)


def test_clip_score_batched_equals_one_by_one(metric_models, noise_image):
    images = [noise_image(64, 64, 1), noise_image(96, 64, 2), noise_image(64, 64, 3), noise_image(50, 90, 4)]
    prompts = ["a photo of a cat", "a dog", "a photo of a cat", "a red house"]  # one prompt shared
    batched = clip_score(metric_models, images, prompts)
    single = [clip_score(metric_models, [img], [p])[0] for img, p in zip(images, prompts)]
    chunked = clip_score(metric_models, images, prompts, batch_size=3)
    assert batched == pytest.approx(single, abs=1e-4)
    assert chunked == pytest.approx(single, abs=1e-4)
    assert clip_score(metric_models, [], []) == []


# ---------------------------------------------------------------------------------------------
# Structure distance by hand


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (512, 512, (224, 224)),
        (513, 512, (224, 224)),
        (640, 480, (224, 298)),  # long side int(224 * 640 / 480)
        (480, 640, (298, 224)),
        (100, 50, (224, 448)),
        (900, 300, (160, 480)),  # long side capped at 480, short side scaled alike
        (300, 900, (480, 160)),
        (1000, 333, (160, 480)),  # torchvision's rule: int(480 * 224 / 672)
    ],
)
def test_structure_size_rule(width, height, expected):
    assert structure_size(width, height) == expected


def _dino_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """[1, 3, h, w]: RGB in [0, 1], antialiased bilinear resize to `size`, ImageNet mean/std."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy() / 255.0)
    x = F.interpolate(x.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _hand_keys_self_sim(dino, pixels: torch.Tensor) -> torch.Tensor:
    """Run the ViT layer by layer up to the last one; its keys are k_proj's weight applied to the last
    layer's normalised input (no hook): all tokens, CLS included, heads side by side."""
    with torch.no_grad():
        hidden = dino.embeddings(pixels, interpolate_pos_encoding=True)
        for layer in dino.layers[:-1]:
            hidden = layer(hidden)
        last = dino.layers[-1]
        normed = last.layernorm_before(hidden)[0]
        keys = normed @ last.attention.k_proj.weight.T + last.attention.k_proj.bias
    norms = keys.norm(dim=1, keepdim=True)
    return (keys @ keys.T) / (norms @ norms.T)


def _hand_structure_dist(models, source: Image.Image, output: Image.Image) -> float:
    size = structure_size(*output.size)
    a = _hand_keys_self_sim(models.dino, _dino_pixels(source, size))
    b = _hand_keys_self_sim(models.dino, _dino_pixels(output, size))
    tokens = 1 + (size[0] // 8) * (size[1] // 8)
    assert a.shape == (tokens, tokens)
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize(
    ("source_size", "output_size"),
    [
        ((64, 64), (64, 64)),
        ((97, 64), (96, 64)),  # the output is a pixel narrower than its source
        ((64, 65), (64, 64)),
        ((300, 512), (296, 512)),  # portrait, long side stays under 480 at 224 short
    ],
)
def test_structure_dist_matches_the_definition(metric_models, noise_image, source_size, output_size):
    source = noise_image(*source_size, seed=1)
    output = noise_image(*output_size, seed=2)
    [dist] = structure_dist(metric_models, [source], [output])
    expected = _hand_structure_dist(metric_models, source, output)
    assert expected > 0
    assert dist == pytest.approx(expected, rel=1e-4)


def test_structure_dist_of_identical_images_is_zero(metric_models, noise_image):
    source = noise_image(80, 64, seed=3)
    same_object, copied = structure_dist(metric_models, [source, source], [source, source.copy()])
    assert same_object == 0.0
    assert copied == pytest.approx(0.0, abs=1e-10)
    [flipped] = structure_dist(metric_models, [source], [source.transpose(Image.FLIP_LEFT_RIGHT)])
    assert flipped > 1e-6


def test_structure_dist_batched_equals_one_by_one(metric_models, noise_image):
    shared = noise_image(64, 64, seed=10)  # one source, two outputs: a group's rows
    sources = [shared, shared, noise_image(97, 64, seed=11), noise_image(64, 64, seed=12)]
    outputs = [noise_image(64, 64, seed=20), noise_image(64, 64, seed=21), noise_image(96, 64, seed=22),
               noise_image(64, 64, seed=23)]
    batched = structure_dist(metric_models, sources, outputs)
    single = [structure_dist(metric_models, [s], [o])[0] for s, o in zip(sources, outputs)]
    chunked = structure_dist(metric_models, sources, outputs, batch_size=1)
    assert batched == pytest.approx(single, rel=1e-4)
    assert chunked == pytest.approx(single, rel=1e-4)
    assert structure_dist(metric_models, [], []) == []


def test_mismatched_lists_are_refused(metric_models, noise_image):
    image = noise_image(64, 64)
    with pytest.raises(ValueError, match="pair up"):
        clip_score(metric_models, [image, image], ["a cat"])
    with pytest.raises(ValueError, match="pair up"):
        structure_dist(metric_models, [image], [])


def test_low_precision_follows_fp32(noise_image):
    """The half-precision path (bf16 here, fp16 on CUDA) casts inputs to the model and scores in fp32."""
    from pnp_batch.eval.models import load_metric_models

    low = load_metric_models("tiny-clip", "tiny-dino", device="cpu", dtype="bfloat16")
    full = load_metric_models("tiny-clip", "tiny-dino", device="cpu", dtype="float32")
    images = [noise_image(64, 64, 1), noise_image(96, 64, 2)]
    sources = [noise_image(64, 64, 3), noise_image(97, 64, 4)]
    assert clip_score(low, images, PROMPTS[:2]) == pytest.approx(clip_score(full, images, PROMPTS[:2]), abs=1.0)
    assert structure_dist(low, sources, images) == pytest.approx(structure_dist(full, sources, images), rel=0.01)
