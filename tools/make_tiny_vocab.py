"""Regenerate pnp_batch/assets/tiny_tokenizer/{vocab.json,merges.txt}: the tiny test model's CLIP BPE.

A byte-level BPE in CLIP's format (every byte as a symbol, word ends marked with "</w>") with merges
learned by plain pair counting over a small built-in English corpus, so that ordinary prompts take
about one token per word, as with the real tokenizer. Deterministic: ties break by the pair itself.
Run from the repository root: python tools/make_tiny_vocab.py
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

_CORPUS_TEXT = """
a an the of in on at to with and or by for from into over under near behind front photo photograph
picture image painting drawing sketch render rendering illustration portrait landscape close up view
cat dog fox tiger lion wolf bear horse zebra cow sheep bird eagle owl fish shark whale dolphin rabbit
mouse squirrel deer elephant giraffe monkey panda koala robot astronaut man woman person child boy
girl people face car truck bus bicycle motorcycle train plane airplane rocket ship boat house building
castle church tower bridge road street city village forest tree trees flower flowers grass field
mountain mountains hill river lake sea ocean beach desert snow ice rain fog cloud clouds sky sun moon
star stars night day morning evening sunset sunrise winter summer autumn fall spring season cup coffee
tea mug table chair bed room kitchen window door wall floor food cake bread fruit apple orange
banana pizza plate bowl glass bottle book camera phone computer statue sculpture toy lego origami
watercolor oil pencil charcoal ink pastel cartoon anime comic pixel art style styled made glass gold
golden silver bronze marble wooden wood stone metal plastic paper crystal red orange yellow green blue
purple pink brown black white gray grey dark bright light colorful vivid soft warm cold old new
young small big large tiny giant beautiful ugly blurry low res unrealistic realistic photorealistic
high quality detailed sharp cinematic lighting studio neon glowing covered snowy rainy foggy sunny
cloudy frozen burning fire water smoke space planet earth mars galaxy nebula launch pad tabby sitting
standing lying running walking flying swimming looking holding wearing suit helmet hat dress shirt
jacket van gogh monet picasso starry impressionist cubist pop sticker poster mosaic stained embroidery
"""
CORPUS = _CORPUS_TEXT.split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte to printable-character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars)))


def train(words: list[str], merges_wanted: int) -> list[tuple[str, str]]:
    b2u = bytes_to_unicode()
    counts = Counter(words)
    seqs = {}
    for w in counts:
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] = sym[-1] + "</w>"
        seqs[w] = sym
    merges: list[tuple[str, str]] = []
    for _ in range(merges_wanted):
        pairs: Counter = Counter()
        for w, sym in seqs.items():
            for a, b in itertools.pairwise(sym):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, sym in seqs.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            seqs[w] = out
    return merges


def main() -> None:
    words = [w for w in re.findall(r"[a-z]+", " ".join(CORPUS).lower())]
    merges = train(words, 2000)
    b2u = bytes_to_unicode()
    vocab_list = list(b2u.values())
    vocab_list += [v + "</w>" for v in vocab_list]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for tok in vocab_list:
        seen.setdefault(tok, len(seen))
    out = Path(__file__).resolve().parent.parent / "pnp_batch" / "assets" / "tiny_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(seen, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    print(f"{len(seen)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main()
