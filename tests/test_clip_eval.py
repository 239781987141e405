"""Zero-shot, Recall@K and few-shot probing on hand-built embeddings with known answers."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from pathor1_jax.eval.fewshot import few_shot, fit_logistic_regression, plot_few_shot, sample_subset
from pathor1_jax.eval.retrieval import recall_at_k
from pathor1_jax.eval.zeroshot import class_embeddings, classification_metrics, load_prompts, zero_shot


def _prompt_file(tmp_path, entry):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"0": entry}))
    return path


def test_class_embedding_is_renormalised_mean_over_synonyms_and_templates(tmp_path):
    path = _prompt_file(
        tmp_path,
        {
            "classnames": {"tumor": ["tumor", "carcinoma"], "normal": ["normal"]},
            "templates": ["a CLASSNAME."],
        },
    )
    classnames, templates = load_prompts(path)
    table = {"a tumor.": [1.0, 0.0], "a carcinoma.": [0.0, 3.0], "a normal.": [-2.0, 0.0]}
    embeds = class_embeddings(lambda texts: np.array([table[t] for t in texts]), classnames, templates)
    np.testing.assert_allclose(embeds, [[np.sqrt(0.5), np.sqrt(0.5)], [-1.0, 0.0]])
    metrics = zero_shot(np.array([[1.0, 1.2], [-1.0, 0.1], [0.2, 1.0]]), embeds, np.array([0, 1, 1]))
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)


def test_classification_metrics_hand_computed():
    m = classification_metrics(np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1]), 2)
    # class 0: P=1, R=1/3, F1=0.5 (support 3); class 1: P=1/3, R=1, F1=0.5 (support 1)
    assert m == pytest.approx({"accuracy": 0.5, "balanced_accuracy": 2 / 3, "weighted_f1": 0.5})


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"classnames": {"a": ["a"]}}, "no 'templates'"),
        ({"templates": ["CLASSNAME"]}, "no 'classnames'"),
        ({"classnames": {"a": []}, "templates": ["CLASSNAME"]}, "class 'a' has no synonyms"),
        # F13: a lone string was split into one-letter synonyms
        ({"classnames": {"a": "tumor"}, "templates": ["CLASSNAME"]}, "class 'a': synonyms must be a list"),
        ({"classnames": {"a": ["a"]}, "templates": "a CLASSNAME"}, "must be a non-empty list of strings"),
        ({"classnames": {"a": ["a"]}, "templates": ["no placeholder"]}, "each contain CLASSNAME"),
    ],
)
def test_bad_prompt_files(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        load_prompts(_prompt_file(tmp_path, entry))


def test_recall_at_k_both_directions():
    images = np.eye(3)
    # text 0 ↔ image 0 ranks first; text 1 is closest to image 2; text 2 to image 1
    texts = np.array([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0], [0.0, 1.0, 0.3]])
    r = recall_at_k(images, texts, ks=(1, 2, 3))
    assert r["i2t@1"] == pytest.approx(1 / 3) and r["t2i@1"] == pytest.approx(1 / 3)
    assert r["i2t@2"] == pytest.approx(1.0) and r["t2i@2"] == pytest.approx(1.0)
    # two captions for image 0: an image query hits if either caption is in the top k
    r = recall_at_k(
        images[:2],
        np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.9, 0.1]]),
        np.array([0, 0, 1]),
        ks=(1,),
    )
    assert r["i2t@1"] == pytest.approx(0.5) and r["t2i@1"] == pytest.approx(2 / 3)


def test_few_shot_is_reproducible_and_learns_separable_classes(tmp_path):
    rng = np.random.default_rng(0)
    centers = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    train_y, test_y = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 10)
    train_x = centers[train_y] + rng.normal(size=(60, 3))
    test_x = centers[test_y] + rng.normal(size=(30, 3))
    a = few_shot(train_x, train_y, test_x, test_y, shots=(2, 8), trials=3, seed=7)
    b = few_shot(train_x, train_y, test_x, test_y, shots=(2, 8), trials=3, seed=7)
    assert a == b and len(a[2]) == 3
    assert np.mean(a[8]) > 0.9
    plot_few_shot(a, tmp_path / "fewshot.png", zero_shot=0.5)
    assert (tmp_path / "fewshot.png").stat().st_size > 0


def test_few_shot_subsets_are_the_official_scripts():
    # The official script: np.random.seed(42 + subset_id); per class in label order,
    # np.random.choice(np.where(targets == cls)[0], size=min(shot, n), replace=False).
    labels = np.array([2, 0, 1, 0, 2, 1, 0, 0, 2, 1, 1, 0])
    for subset_id in (1, 2, 10):
        np.random.seed(42 + subset_id)
        expected = []
        for cls in range(3):
            idxs = np.where(labels == cls)[0]
            expected += np.random.choice(idxs, size=min(3, len(idxs)), replace=False).tolist()
        np.testing.assert_array_equal(sample_subset(labels, 3, subset_id), expected)
    assert np.bincount(labels[sample_subset(labels, 8, 1)]).tolist() == [5, 4, 3]  # all of a small class


@pytest.mark.parametrize("shots", [2, 16, 64])
def test_logistic_regression_equals_scikit_learn(shots):
    from sklearn.linear_model import LogisticRegression

    # Raw, unnormalised features of four classes (norms ~15, like CLIP image embeddings), overlapping
    # enough that the C = 1 penalty shapes the solution; scikit-learn with the script's settings.
    rng = np.random.default_rng(shots)
    centers = rng.normal(scale=3.0, size=(4, 24))
    train_y, test_y = np.repeat(np.arange(4), 80), np.repeat(np.arange(4), 25)
    train_x = centers[train_y] + rng.normal(scale=2.0, size=(320, 24))
    test_x = centers[test_y] + rng.normal(scale=2.0, size=(100, 24))
    idx = sample_subset(train_y, shots, 1)
    x, y = train_x[idx].astype(np.float32), train_y[idx]
    (w, b), iterations = fit_logistic_regression(jnp.asarray(x), jnp.asarray(y), 4)
    official = LogisticRegression(C=1.0, max_iter=1000, solver="lbfgs").fit(x.astype(np.float64), y)
    assert 0 < int(iterations) <= 1000
    predicted = np.argmax(test_x @ np.asarray(w) + np.asarray(b), axis=-1)
    assert (predicted == official.predict(test_x)).mean() == 1.0
    assert (predicted == test_y).mean() == official.score(test_x, test_y)
    assert np.abs(np.asarray(w).T - official.coef_).max() <= 1e-3 * np.abs(official.coef_).max()
    assert np.abs(np.asarray(b) - official.intercept_).max() <= 1e-3 * np.abs(official.intercept_).max()
    # C = 1 regularises the sum of losses (1/(2n) on the mean loss): a weaker penalty, larger weights
    weaker, _ = fit_logistic_regression(jnp.asarray(x), jnp.asarray(y), 4, C=100.0)
    assert np.abs(np.asarray(weaker[0])).max() > 1.5 * np.abs(np.asarray(w)).max()


def test_preprocess_equals_hf_clip_image_processor():
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from pathor1_jax.models.clip.preprocess import preprocess

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8))
    ref = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    expected = np.asarray(ref(images=[image], return_tensors="np")["pixel_values"])[0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess(image, 56), expected, atol=1e-5)


def test_eval_clip_command(tmp_path, capsys):
    import torch
    from PIL import Image
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel as HFModel

    from pathor1_jax.cli import main
    from pathor1_jax.models import clip

    torch.manual_seed(0)
    HFModel(HFConfig(**clip.tiny_config().to_hf_dict())).save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(
            json.dumps({"image": f"{i}.png", "label": "tumor" if i % 2 else "normal", "caption": f"tile {i}"})
        )
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    prompts = _prompt_file(
        tmp_path, {"classnames": {"normal": ["normal"], "tumor": ["tumor"]}, "templates": ["a CLASSNAME."]}
    )
    base = ["eval", "clip", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl")]
    assert main([*base, "--task", "retrieval"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {
        f"{d}@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10, 20)
    }
    assert main([*base, "--task", "zeroshot", "--prompts", str(prompts)]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    (tmp_path / "bad.jsonl").write_text('{"image": "0.png"}\n')
    assert (
        main([*base[:-1], str(tmp_path / "bad.jsonl"), "--task", "zeroshot", "--prompts", str(prompts)]) == 2
    )
    assert "bad.jsonl:1" in capsys.readouterr().err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.jsonl").write_text('{"image": "broken.png", "caption": "x"}\n')
    assert main([*base[:-1], str(tmp_path / "broken.jsonl"), "--task", "retrieval"]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_eval_clip_fewshot_requires_held_out_test_data(tmp_path):
    import argparse

    from pathor1_jax.errors import UserError
    from pathor1_jax.eval import clip_tasks

    parser = argparse.ArgumentParser()
    clip_tasks.add_arguments(parser)
    data = tmp_path / "train.jsonl"
    data.write_text('{"image": "a.png", "label": "x"}\n')
    argv = ["--model", str(tmp_path), "--task", "fewshot", "--data", str(data), "--prompts", "p.json"]
    with pytest.raises(UserError, match="--task fewshot needs --test-data"):
        clip_tasks.run(parser.parse_args(argv))
