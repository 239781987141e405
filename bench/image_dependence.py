"""Does a trained Qwen2.5-VL read the image? Three measurements on the embedded demo tiles.

1. The information is there: a linear probe (multinomial logistic regression on standardised
   features, `eval.fewshot.fit_logistic_regression`) of the tissue from the vision tower's merged
   tokens (mean over a tile's tokens), train tiles → held-out tiles; and how alike the tissues look
   to the language model: the cosine between the class means of those features.
2. The language model uses it (swap test): the NLL of each held-out tissue chat's answer with its
   own tile and with a tile of another tissue (same text); equal NLLs = the image is ignored.
3. The decision: at the first word after `<think>` (the word that names the tissue in the demo's
   chats), the share of held-out tiles whose own tissue's word scores highest of the three.

Usage: python bench/image_dependence.py RUN_DIR [--records 90]
(RUN_DIR: a training run directory, e.g. runs/demo/sft, or an HF checkpoint.)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pathor1_jax.data.demo import demo_records, tile_class
from pathor1_jax.data.images import load_image
from pathor1_jax.eval.fewshot import fit_logistic_regression
from pathor1_jax.models.qwen2_5_vl import vision_index
from pathor1_jax.train.loading import load_for_inference

THINK = "<think>"


def tile_features(model, processor, records, chunk: int = 30) -> np.ndarray:
    """Mean merged token of each caption record's tile `[N, D]`."""
    visual = nnx.jit(lambda m, pixels, index: m.model.visual(pixels, index))
    out = []
    for i in range(0, len(records), chunk):
        part = records[i : i + chunk]
        images = [load_image(r.image, record_id=r.id) for r in part]
        processed = processor.image_processor(images)
        pixels = np.asarray(processed["pixel_values"], np.float32)
        grid = np.asarray(processed["image_grid_thw"]).reshape(-1, 3)
        per_tile = len(pixels) // len(part)
        padded = np.pad(pixels, ((0, chunk * per_tile - len(pixels)), (0, 0)))  # one compiled shape
        index = vision_index(grid, model.config.vision, chunk * per_tile)
        feats = np.asarray(visual(model, jnp.asarray(padded), index))[: len(pixels) // 4]
        out.append(feats.reshape(len(part), -1, feats.shape[-1]).mean(axis=1))
    return np.concatenate(out)


def probe(train_x, train_y, test_x, test_y) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    (w, b), _ = fit_logistic_regression(
        jnp.asarray((train_x - mean) / std), jnp.asarray(train_y), int(train_y.max()) + 1
    )
    return float((np.argmax(((test_x - mean) / std) @ np.asarray(w) + np.asarray(b), -1) == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="run directory or HF checkpoint")
    parser.add_argument("--records", type=int, default=90, help="held-out tissue chats (default: all 90)")
    args = parser.parse_args()
    model, processor = load_for_inference(args.model)
    cfg, tok = model.config, processor.tokenizer

    train, test = demo_records("caption", "train"), demo_records("caption", "test")
    classes = sorted({tile_class(r.id) for r in train})
    label = {c: i for i, c in enumerate(classes)}
    train_x, test_x = tile_features(model, processor, train), tile_features(model, processor, test)
    train_y = np.array([label[tile_class(r.id)] for r in train])
    test_y = np.array([label[tile_class(r.id)] for r in test])
    means = np.stack([train_x[train_y == k].mean(0) for k in range(len(classes))])
    unit = means / np.linalg.norm(means, axis=-1, keepdims=True)
    cosines = [float(unit[a] @ unit[b]) for a in range(len(classes)) for b in range(a + 1, len(classes))]

    chats = [r for r in demo_records("chat", "test") if "-tissue-" in r.id][: args.records]
    examples = [processor.encode(r) for r in chats]
    chat_class = np.array([label[tile_class(r.id)] for r in chats])
    words = {}  # each tissue's first think word, read from the chats
    for r, k in zip(chats, chat_class, strict=True):
        think = r.messages[-1].content.split(THINK, 1)[1].split("</think>", 1)[0]
        words.setdefault(int(k), think.split()[0].strip(",.:;"))
    word_ids = jnp.asarray(
        [tok(words[k], add_special_tokens=False)["input_ids"][0] for k in range(len(classes))]
    )

    @nnx.jit
    def answer_nll_and_first_word(m, ids, positions, pixels, index, labels, word_at):
        logp = jax.nn.log_softmax(m(ids, pixel_values=pixels, position_ids=positions, vision_index=index)[0])
        targets, valid = labels[0, 1:], labels[0, 1:] >= 0
        nll = -jnp.sum(jnp.take_along_axis(logp[:-1], jnp.maximum(targets, 0)[:, None], -1)[:, 0] * valid)
        return nll, logp[word_at - 1, word_ids]  # the three words' scores where the first is predicted

    # tokens of the answer before its first think word: `<think>` and the new line after it
    before_word = chats[0].messages[-1].content.split(words[int(chat_class[0])], 1)[0]
    think_len = len(tok(before_word, add_special_tokens=False)["input_ids"])
    own, swapped, correct = [], [], []
    for i, ex in enumerate(examples):
        j = next(k for k in np.roll(np.arange(len(examples)), -i) if chat_class[k] != chat_class[i])
        labels = ex["labels"]
        word_at = int(np.flatnonzero(labels >= 0)[0]) + think_len  # the answer starts with <think>\n
        common = (jnp.asarray(ex["input_ids"][None]), jnp.asarray(ex["position_ids"][:, None]))
        for source, into in ((ex, own), (examples[j], swapped)):
            index = vision_index(source["image_grid_thw"], cfg.vision)
            nll, scores = answer_nll_and_first_word(
                model,
                *common,
                jnp.asarray(source["pixel_values"]),
                index,
                jnp.asarray(labels[None]),
                word_at,
            )
            into.append(float(nll))
            if source is ex:
                correct.append(int(np.argmax(np.asarray(scores))) == chat_class[i])
    print(f"model: {args.model}")
    print("| measurement | value |\n|---|---|")
    print(
        f"| linear probe of the tissue, tile features ({len(train)} train -> {len(test)} held-out tiles) "
        f"| {probe(train_x, train_y, test_x, test_y):.3f} (chance {1 / len(classes):.3f}) |"
    )
    print(f"| cosine between the tissues' mean features | {' / '.join(f'{c:.4f}' for c in cosines)} |")
    print(f"| answer NLL, own tile ({len(chats)} held-out tissue chats) | {np.mean(own):.4f} |")
    print(f"| answer NLL, another tissue's tile | {np.mean(swapped):.4f} |")
    print(
        f"| first think word ({'/'.join(words[k] for k in range(len(classes)))}) right "
        f"| {np.mean(correct):.3f} (chance {1 / len(classes):.3f}) |"
    )


if __name__ == "__main__":
    main()
