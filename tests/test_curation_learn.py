"""classify and cluster: the JAX k-means equals scikit-learn on planted clusters; the softmax head
learns planted classes; keyword weak labels; the classify → review CSV → corrected retrain loop and
the cluster → difficulty rule on the demo tiles (tiny random CLIP)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pathor1_jax.curation.classify import keyword_label, tissue_system
from pathor1_jax.curation.io import read_jsonl, write_jsonl
from pathor1_jax.curation.jax_ops import default_mesh, kmeans, predict_head, train_head


def planted(seed=0, sizes=(50, 80, 31), d=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (len(sizes), d))
    x = np.concatenate([c + rng.normal(0, 1, (n, d)) for c, n in zip(centres, sizes, strict=True)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def test_kmeans_equals_scikit_learn_on_planted_clusters():
    sklearn = pytest.importorskip("sklearn.cluster")
    from sklearn.metrics import adjusted_rand_score

    x, truth = planted()
    centres, labels, inertia = kmeans(x, 3, default_mesh(), n_init=10, seed=0)
    ref = sklearn.KMeans(3, n_init=10, random_state=0).fit(x)
    assert adjusted_rand_score(labels, ref.labels_) == 1.0 == adjusted_rand_score(labels, truth)
    order, ref_order = np.argsort(centres[:, 0]), np.argsort(ref.cluster_centers_[:, 0])
    np.testing.assert_allclose(centres[order], ref.cluster_centers_[ref_order], atol=1e-4)
    assert inertia == pytest.approx(ref.inertia_, rel=1e-5)
    with pytest.raises(ValueError, match="at least k=3 points, got 2"):
        kmeans(x[:2], 3, default_mesh())


def test_head_learns_planted_classes_from_partial_labels():
    x, y = planted(seed=1)
    partial = y.copy()
    partial[::3] = -1  # unlabelled rows are ignored by the loss
    W, b, losses = train_head(x, partial, 3, default_mesh())
    assert losses[-1] < 0.05 * losses[0]
    assert (predict_head(x, W, b).argmax(1) == y).mean() == 1.0


def test_keyword_weak_labels_and_tissue_systems():
    assert keyword_label("Colonic mucosa, FHL2 immunostain. A Low-power view.") == "IHC"
    assert keyword_label("Normal skin, H&E. (A) Epidermis.") == "histopathology"
    assert keyword_label("HER2 amplification by FISH: clusters of red signals.") == "FISH"
    assert keyword_label("Fine-needle aspirate, Papanicolaou stain.") == "cytology"
    assert keyword_label("Cut surface of the resected kidney.") == "gross"
    assert keyword_label("Chest radiograph.") == "other"
    assert keyword_label("An unremarkable picture.") is None
    assert tissue_system("Colonic crypts") == "gastrointestinal" and tissue_system("A cell") == "unspecified"


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    """36 demo tiles as extracted pairs: 12 IHC colon, 24 H&E (skin, tumour); captions with keywords."""
    from pathor1_jax.data.demo import demo_dir

    root = tmp_path_factory.mktemp("learn")
    rows = []
    for line in open(f"{demo_dir()}/caption_train.jsonl"):
        rec = __import__("json").loads(line)
        kind = rec["id"].split("-")[0]
        if sum(r["id"].startswith(kind) for r in rows) < 12:
            rows.append(
                {
                    "id": rec["id"],
                    "image": f"{demo_dir()}/{rec['image']}",
                    "caption": rec["caption"],
                    "inline_refs": [],
                    "source": "demo",
                    "figure": rec["id"],
                }
            )
    write_jsonl(root / "pairs.jsonl", rows)
    return root


def test_classify_review_cluster_then_corrected_retrain(demo_pairs, tmp_path, monkeypatch):
    """classify → review.csv → cluster, then the README's human loop: the same `--out` retrained with
    `--labels` (the cached embeddings are reused: the CLIP is not run again)."""
    from pathor1_jax.curation import classify
    from pathor1_jax.curation.steps import run_classify, run_cluster

    out_dir = tmp_path / "classify"
    run_classify(str(demo_pairs), str(out_dir), steps=200)
    out = {r["id"]: r for r in read_jsonl(out_dir / "pairs.jsonl")}
    truth = {k: "IHC" if k.startswith("ihc") else "histopathology" for k in out}
    assert all(r["weak_label"] == truth[k] for k, r in out.items())
    # the head fits its weak labels on features of an untrained tiny CLIP (plumbing, not accuracy)
    assert np.mean([r["subfield"] == truth[k] for k, r in out.items()]) >= 0.85
    with open(out_dir / "review.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 and [float(r["confidence"]) for r in rows] == sorted(
        float(r["confidence"]) for r in rows
    )

    run_cluster(str(out_dir), str(tmp_path / "k"), n_init=4)
    clustered = read_jsonl(tmp_path / "k" / "pairs.jsonl")
    assert len(clustered) == 36
    for sub in ("IHC", "histopathology"):
        levels = {r["cluster"]: r["difficulty"] for r in clustered if r["subfield"] == sub}
        assert sorted(levels.values()) == ["easy", "hard", "medium"]  # 3 clusters -> the 3 levels
        info = {
            c: np.mean([len(r["caption"].split()) for r in clustered if r["cluster"] == c]) for c in levels
        }
        by_level = {levels[c]: info[c] for c in levels}
        assert by_level["easy"] <= by_level["medium"] <= by_level["hard"]  # our ordering rule
    with open(tmp_path / "k" / "cluster_samples.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 36

    target = next(r for r in rows if r["id"].startswith("he_skin"))
    target["corrected"] = "dermatology"
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerow(target)
    with pytest.raises(ValueError, match=r"bad.csv:2: corrected subfield 'dermatology' is not one of"):
        run_classify(str(demo_pairs), str(out_dir), labels=str(tmp_path / "bad.csv"))
    target["corrected"] = "gross"  # a person corrects one prediction
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def no_clip(*a, **k):
        raise AssertionError("the retrain recomputed the embeddings")

    monkeypatch.setattr(classify, "embed", no_clip)
    run_classify(str(demo_pairs), str(out_dir), labels=str(tmp_path / "labels.csv"), steps=200)
    again = {r["id"]: r for r in read_jsonl(out_dir / "pairs.jsonl")}
    assert (again[target["id"]]["subfield"], again[target["id"]]["subfield_source"]) == ("gross", "manual")
    assert sum(r["subfield_source"] == "manual" for r in again.values()) == 1


@pytest.mark.multidevice
def test_kmeans_and_head_sharded_over_8_devices_equal_one_device():
    from multidevice import run_on_8_devices

    out = run_on_8_devices("""
        import json, numpy as np, jax
        from pathor1_jax.curation.jax_ops import HeadConfig, default_mesh, kmeans, train_head, shard_rows
        rng = np.random.default_rng(0)
        centres = rng.normal(0, 5, (3, 16))
        x = np.concatenate([c + rng.normal(0, 1, (n, 16)) for c, n in zip(centres, (50, 80, 31))])
        x = x.astype(np.float32)
        y = np.repeat([0, 1, 2], [50, 80, 31])
        mesh8 = default_mesh()
        mesh1 = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), mesh8.axis_names)
        xs, w = shard_rows(x, mesh8)
        res = {"devices": mesh8.devices.size, "rows": xs.shape[0], "shards": len(xs.addressable_shards)}
        for name, mesh in (("m8", mesh8), ("m1", mesh1)):
            c, labels, inertia = kmeans(x, 3, mesh, n_init=2, iters=20)
            W, b, losses = train_head(x, y, 3, mesh, HeadConfig(steps=50))
            res[name] = {"labels": labels.tolist(), "inertia": inertia, "W": W.tolist(), "loss": losses[-1]}
        print(json.dumps(res))
    """)
    res = __import__("json").loads(out.strip().splitlines()[-1])
    assert (res["devices"], res["rows"], res["shards"]) == (8, 168, 8)  # 161 rows padded to 8 x 21
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(res["m8"]["labels"], res["m1"]["labels"]) == 1.0
    assert res["m8"]["inertia"] == pytest.approx(res["m1"]["inertia"], rel=1e-5)
    np.testing.assert_allclose(res["m8"]["W"], res["m1"]["W"], atol=1e-4)
    assert res["m8"]["loss"] == pytest.approx(res["m1"]["loss"], rel=1e-3, abs=1e-5)
