"""evaluate.py and compare.py: the protocols against independent references, CLI errors,
and a shortened equal-budget comparison.

    python -m pytest test_evaluate.py -q
"""
import collections
import contextlib
import functools
import itertools
import json
import math
import os
from unittest import mock

import pytest
import torch

import compare
import data
import evaluate
import pqcl
from test_pqcl import DIM, GRID, HEADS, IMG, PATCH, randomize_


def unit_vectors(degrees):
    angles = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def brute_force_knn(train_features, train_labels, test_features, k, temperature, weighted=True):
    """Predictions of the weighted k-NN, one test image at a time, with plain Python loops."""
    predictions = []
    for query in test_features:
        sims = [float(query @ x / (query.norm() * x.norm())) for x in train_features]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = collections.defaultdict(float)
        for i in nearest:
            votes[int(train_labels[i])] += math.exp(sims[i] / temperature) if weighted else 1.0
        predictions.append(max(votes, key=votes.get))
    return torch.tensor(predictions)


def test_knn_weighting_changes_the_vote():
    """Hand-made: each query's 3 nearest neighbours hold a 2-1 majority for the wrong class, but
    the single close neighbour outweighs them at T = 0.07 (exp(sim / T) votes)."""
    train = unit_vectors([0, 55, -55, 180])  # classes 1, 0, 0, 1
    train_labels = torch.tensor([1, 0, 0, 1])
    test = unit_vectors([0, 100]) * torch.tensor([[3.0], [0.5]])  # norms must not matter (cosine)
    # query 0: sims 1, .57, .57, -1 -> majority 0, weighted 1; query 1: sims -.17, .71, -.91, .17 -> majority 1, weighted 0
    test_labels = torch.tensor([1, 0])
    assert brute_force_knn(train, train_labels, test, 3, 0.07).tolist() == [1, 0]
    assert brute_force_knn(train, train_labels, test, 3, 0.07, weighted=False).tolist() == [0, 1]
    scores = evaluate.knn_scores(train.float(), train_labels, test.float(), test_labels, ks=(3,), temperature=0.07)
    assert scores == {"knn_top1_k3": 100.0}  # a plain majority vote would score 0


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_brute_force_in_chunks(k):
    """evaluate.knn_top1, chunked over the test set (chunk 7), predicts exactly as the loop: test
    labels set to the loop's predictions score 100%, shifted by one class 0%."""
    gen = torch.Generator().manual_seed(k)
    train, test = torch.randn(60, 8, generator=gen), torch.randn(23, 8, generator=gen)
    train_labels = torch.randint(4, (60,), generator=gen)
    reference = brute_force_knn(train, train_labels, test, k, 0.07)
    train, test = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    assert evaluate.knn_top1(train, train_labels, test, reference, k, 0.07, chunk=7) == 100.0
    assert evaluate.knn_top1(train, train_labels, test, (reference + 1) % 4, k, 0.07, chunk=7) == 0.0


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_scores_normalise_the_features(k):
    """The protocol (evaluate.knn_scores) on raw features whose norms span 1e-2 to 1e2 predicts
    as the cosine brute force: labels set to its predictions score 100%, shifted 0%. On these
    norms a dot product, unnormalised, picks other neighbours and other weights."""
    gen = torch.Generator().manual_seed(k)
    train, test = torch.randn(60, 8, generator=gen), torch.randn(23, 8, generator=gen)
    train = train * torch.logspace(-2, 2, 60)[torch.randperm(60, generator=gen)][:, None]
    test = test * torch.logspace(-2, 2, 23)[torch.randperm(23, generator=gen)][:, None]
    train_labels = torch.randint(4, (60,), generator=gen)
    reference = brute_force_knn(train, train_labels, test, k, 0.07)
    for labels, expected in ((reference, 100.0), ((reference + 1) % 4, 0.0)):
        assert evaluate.knn_scores(train, train_labels, test, labels, ks=(k,), temperature=0.07) == \
               {f"knn_top1_k{k}": expected}


def test_segmentation_scores_by_hand():
    """Confusion matrix and mIoU / pixel accuracy of 8 hand-labelled pixels; class 3 is only
    predicted, never a target, so it is not in the mean."""
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2]).view(2, 2, 2)
    predictions = torch.tensor([0, 0, 1, 3, 1, 1, 0, 2]).view(2, 2, 2)
    expected = torch.tensor([[2, 1, 0, 1],
                             [1, 2, 0, 0],
                             [0, 0, 1, 0],
                             [0, 0, 0, 0]])
    confusion = evaluate.confusion_matrix(predictions, targets, 4)
    assert torch.equal(confusion, expected)
    # IoU = TP / (targets + predictions - TP): class 0 2/(4+3-2), class 1 2/(3+3-2), class 2 1/1
    scores = evaluate.segmentation_scores(confusion)
    assert scores["dense_miou"] == pytest.approx(100 * (2 / 5 + 2 / 4 + 1) / 3)
    assert scores["dense_pixel_acc"] == pytest.approx(100 * 5 / 8)


def test_linear_probe_separates_separable_features():
    """Three classes, linearly separable with a margin, features on scales from 1e-3 to 1e3
    (the probe standardises them): top-1 ~100% on held-out points."""
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 16, generator=gen)
    points = torch.randn(4000, 16, generator=gen)
    scores = points @ directions.T  # (n, 3)
    top2 = scores.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1] > 1.0
    points, labels = points[margin], scores.argmax(1)[margin]
    points = points * torch.logspace(-3, 3, 16)
    half = len(points) // 2
    assert evaluate.linear_top1(points[:half], labels[:half], points[half:], labels[half:]) >= 99.0


def test_patch_majority_labels_match_counting_loop():
    """Most frequent label per P x P patch, row-major, ties to the lowest label, vs Counter."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.randint(4, (3, 8, 12), generator=gen).to(torch.uint8)[:, :, :8]  # (n, S, S), S = 8, P = 4
    maps[0, :4, :4] = torch.tensor([2, 3] * 8).view(4, 4)  # a tie: 8 x 2, 8 x 3 -> 2
    got = evaluate.patch_majority_labels(maps, 4, 4)
    expected = torch.zeros(3, 4, dtype=torch.long)
    for n, row, col in itertools.product(range(3), range(2), range(2)):
        counts = collections.Counter(maps[n, 4 * row:4 * row + 4, 4 * col:4 * col + 4].flatten().tolist())
        expected[n, 2 * row + col] = min(label for label, c in counts.items() if c == max(counts.values()))
    assert expected[0, 0] == 2
    assert torch.equal(got, expected)


def test_features_match_direct_computation():
    """backbone_features = the ViT's tokens on ImageNet-normalised pixels ([CLS], [CLS] + mean
    patch, patches); pixel_features' patches = direct slices of the image, row-major."""
    torch.manual_seed(0)
    vit = randomize_(pqcl.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=1,
                                            num_heads=HEADS)).eval()
    images = torch.randint(256, (5, 3, IMG, IMG), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, std = torch.tensor(pqcl.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(pqcl.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = vit((images.float() / 255 - mean) / std)  # (n, 1 + N, D)
    features = evaluate.backbone_features(vit, images, keep_patches=True)
    torch.testing.assert_close(features["image"], tokens[:, 0])
    torch.testing.assert_close(features["cls_avgpool"], torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1))
    torch.testing.assert_close(features["patches"], tokens[:, 1:])
    pixels = evaluate.pixel_features(images, PATCH, keep_patches=True)
    assert torch.equal(pixels["image"], images.flatten(1).float() / 255)
    for row, col in itertools.product(range(GRID), range(GRID)):
        patch = images[:, :, PATCH * row:PATCH * (row + 1), PATCH * col:PATCH * (col + 1)].flatten(1).float() / 255
        assert torch.equal(pixels["patches"][:, GRID * row + col], patch)


def test_dense_probe_recovers_a_patch_aligned_map():
    """Label maps split at a patch boundary (class c left, background right), features = one-hot
    of the patch's label + noise: the probe, upsampled to pixels, is right but for a few pixels at
    the boundary, where bilinear weights reach 0.375 (a transposed or shifted map would miss
    whole columns of patches)."""
    gen = torch.Generator().manual_seed(0)
    num, size, patch, classes = 48, 16, 4, 4
    grid = size // patch
    cut = torch.randint(1, grid, (num,), generator=gen) * patch  # (n,) pixel column of the boundary
    label = torch.randint(1, classes, (num,), generator=gen)
    maps = torch.where(torch.arange(size)[None, None, :] < cut[:, None, None], label[:, None, None], 0)
    maps = maps.expand(num, size, size).to(torch.uint8)  # (n, S, S)
    patch_labels = maps[:, ::patch, ::patch].flatten(1).long()  # (n, N): constant patches
    features = torch.nn.functional.one_hot(patch_labels, 8).float() + 0.1 * torch.randn(num, grid * grid, 8, generator=gen)
    scores = evaluate.dense_scores(features[:32], maps[:32], features[32:], maps[32:],
                                   recipe=dict(evaluate.DENSE_RECIPE, epochs=20, batch_size=64))
    assert scores["dense_pixel_acc"] >= 99.0 and scores["dense_miou"] >= 98.0, scores


FASHION_MNIST_INSTALLED = os.path.exists(os.path.join(data.FASHION_MNIST, "train-images-idx3-ubyte.gz"))


def run_main(main, argv, capsys):
    """A command's main (evaluate.main, compare.main) in this process -> (exit status, stderr lines)."""
    status = main(argv)
    return status, capsys.readouterr().err.splitlines()


def fashion_mnist_missing(tmp_path):
    return mock.patch.dict(data.BUILTIN_DATASETS,
                           {"fashion-mnist": functools.partial(data.fashion_mnist_splits, root=str(tmp_path))})


@pytest.mark.parametrize("main,argv,says", [
    (evaluate.main, ["knn", "no/such/checkpoint.pth"], "no/such/checkpoint.pth: no such file"),
    (evaluate.main, ["linear", "pixels", "--data", "imagenet"], "invalid choice"),
    (evaluate.main, ["knn", "pixels", "--train-images", "5"], "--train-images 5"),
    (evaluate.main, ["knn", "pixels", "--", "--depth", "1"], "unrecognized arguments"),
    (compare.main, ["--steps", "0"], "--steps 0"),
    (compare.main, ["--seeds", "1", "1"], "repeated"),
    (compare.main, ["--", "--framework", "dino"], "--framework"),
    (compare.main, ["--", "--no-such-flag"], "unrecognized arguments"),
])
def test_evaluate_bad_input_is_one_line_exit_2(main, argv, says, capsys):
    status, err = run_main(main, argv, capsys)
    assert status == 2 and len(err) == 1 and says in err[0], err


def test_missing_fashion_mnist_says_how_to_install(tmp_path, capsys):
    """Every command that needs Fashion-MNIST exits 2 with the apt-get hint; the comparison before
    it writes anything."""
    out = tmp_path / "results"
    with fashion_mnist_missing(tmp_path):
        for main, argv in ((evaluate.main, ["knn", "pixels", "--data", "fashion-mnist"]),
                           (compare.main, ["--datasets", "fashion-mnist", "--out", str(out)])):
            status, err = run_main(main, argv, capsys)
            assert status == 2 and len(err) == 1 and "apt-get install -y dataset-fashion-mnist" in err[0], err
    assert not out.exists()


def test_dense_needs_label_maps(capsys):
    """Only the embedded set has label maps: dense on another set is a one-line error."""
    images = torch.zeros(24, 3, 32, 32, dtype=torch.uint8)
    no_maps = (images, torch.arange(24) % 2, None)
    with mock.patch.dict(data.BUILTIN_DATASETS, {"fashion-mnist": lambda seed, size: (no_maps, no_maps)}):
        status, err = run_main(evaluate.main, ["dense", "pixels", "--data", "fashion-mnist"], capsys)
    assert status == 2 and len(err) == 1 and "label maps" in err[0], err


@contextlib.contextmanager
def small_embedded():
    """The embedded set cut to 128 training and 48 test images (generated in a fraction of a second)."""
    with mock.patch.multiple(data, EMBEDDED_TRAIN=128, EMBEDDED_TEST=48):
        yield


# 2 steps of batch 16 per run (one epoch over 32 images), a one-block ViT, small heads, probes on 96 / 48 images
TINY_BENCHMARK = ["--seeds", "0", "--steps", "2", "--train-images", "96", "--test-images", "48", "--",
                  "--epochs", "1", "--depth", "1", "--batch-size", "16", "--out-dim", "64", "--hidden-dim", "64",
                  "--bottleneck-dim", "32"]
BENCHMARK_DATASETS = ["embedded"] + (["fashion-mnist"] if FASHION_MNIST_INSTALLED else [])


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    """The benchmark command, shortened: every method, one seed, 2 steps, both datasets if installed."""
    out = str(tmp_path_factory.mktemp("benchmark"))
    argv = ["--out", out, "--datasets", *BENCHMARK_DATASETS, *TINY_BENCHMARK]
    with small_embedded():
        assert compare.main(argv) == 0
    with open(os.path.join(out, "comparison.json")) as f:
        return out, argv, json.load(f)


def read_json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def check_benchmark_rows(out, report, dataset):
    rows = report["results"][dataset]
    assert list(rows) == [*compare.METHODS, *compare.BASELINES]
    has_maps = dataset == "embedded"
    for row, metrics in rows.items():
        expected = {"knn_top1_k10", "knn_top1_k20", "linear_top1"}
        expected |= {"dense_miou", "dense_pixel_acc"} if has_maps else set()
        expected |= {"linear_top1_cls_avgpool"} if row != "raw pixels" else set()
        expected |= {"images_per_s"} if row in compare.METHODS else set()
        assert set(metrics) == expected, (row, set(metrics) ^ expected)
        for metric, stats in metrics.items():
            assert len(stats["values"]) == 1 and stats["std"] is None
            assert stats["mean"] >= 0 and (metric == "images_per_s" or stats["mean"] <= 100)
    configs = []
    for row in compare.METHODS:  # equal budget: the same steps and architecture, only the method differs
        checkpoint = torch.load(os.path.join(compare.run_folder(out, dataset, row, 0), "checkpoint.pth"),
                                weights_only=True)
        assert checkpoint["step"] == 2
        configs.append({k: v for k, v in checkpoint["config"].items() if k not in ("framework", "query_weight")})
    assert all(config == configs[0] for config in configs)
    with open(os.path.join(out, "comparison.md")) as f:
        table = f.read()
    assert f"**{dataset}**" in table and all(f"| {row} |" in table for row in rows)


def test_tiny_benchmark_embedded(tiny_benchmark):
    out, _, report = tiny_benchmark
    check_benchmark_rows(out, report, "embedded")


@pytest.mark.skipif(not FASHION_MNIST_INSTALLED, reason="Fashion-MNIST is not installed "
                    "(apt-get install -y dataset-fashion-mnist): the benchmark's Fashion-MNIST half is not tested")
def test_tiny_benchmark_fashion_mnist(tiny_benchmark):
    out, _, report = tiny_benchmark
    check_benchmark_rows(out, report, "fashion-mnist")


def test_tiny_benchmark_baselines_are_the_methods_common_start(tiny_benchmark):
    """The baseline rows do not depend on the method, the method rows do: the four runs (one
    seed) start from the same teacher backbone, built from their configs, and end with four
    different ones; the 'random init' row's k-NN is the cosine brute force on that start's
    features, the 'raw pixels' row's on the pixels, over the same 96 + 48 images."""
    out, _, report = tiny_benchmark
    rows = report["results"]["embedded"]
    starts, ends = [], []
    for row in compare.METHODS:
        checkpoint = torch.load(os.path.join(compare.run_folder(out, "embedded", row, 0), "checkpoint.pth"),
                                weights_only=True)
        cfg = pqcl.Config(**checkpoint["config"])
        torch.manual_seed(cfg.seed)  # as train_ddp.py seeds the model
        starts.append(pqcl.PQCL(cfg).teacher.backbone.eval())
        ends.append({k: v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")})
    start_state = starts[0].state_dict()
    for backbone in starts[1:]:
        assert all(torch.equal(v, start_state[k]) for k, v in backbone.state_dict().items())
    for i, end in enumerate(ends):
        assert any(not torch.equal(v, start_state[k.removeprefix("backbone.")]) for k, v in end.items())
        assert all(any(not torch.equal(v, other[k]) for k, v in end.items()) for other in ends[i + 1:])
    with small_embedded():
        (train_images, train_labels, _), (test_images, test_labels, _) = evaluate.first(
            data.embedded_splits(0, cfg.img_size), 96, 48)
    features = {"random init": [evaluate.backbone_features(starts[0], images, keep_patches=False)
                                for images in (train_images, test_images)],
                "raw pixels": [{"image": images.flatten(1).float() / 255} for images in (train_images, test_images)]}
    for row, (train, test) in features.items():
        for k in (10, 20):
            predictions = brute_force_knn(train["image"], train_labels, test["image"], k, 0.07)
            assert rows[row][f"knn_top1_k{k}"]["mean"] == pytest.approx(
                100 * (predictions == test_labels).double().mean().item(), abs=1e-9), (row, k)
        # k-NN scores of two random inits often coincide on 48 images; their linear probes do not
        for kind, metric in (("image", "linear_top1"), ("cls_avgpool", "linear_top1_cls_avgpool")):
            if kind in train:
                assert rows[row][metric]["mean"] == evaluate.linear_top1(train[kind], train_labels, test[kind],
                                                                         test_labels, seed=0), (row, metric)


def test_benchmark_resumes(tiny_benchmark, capsys):
    """Rerunning skips finished runs; a run that lost its export and evaluation resumes from its
    checkpoint and scores the same; other settings in the same folder are refused."""
    out, argv, report = tiny_benchmark
    run_dir = compare.run_folder(out, "embedded", "PQCL-iBOT", 0)
    before = read_json(run_dir, "evaluation.json")
    os.remove(os.path.join(run_dir, "evaluation.json"))
    os.remove(os.path.join(run_dir, "backbone.pth"))
    with small_embedded():
        assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert sum(line.endswith(": done before") for line in printed.splitlines()) == len(BENCHMARK_DATASETS) * 6 - 1
    after = read_json(run_dir, "evaluation.json")
    assert {k: after[k] for k in compare.COLUMNS if k != "images_per_s"} == \
           {k: before[k] for k in compare.COLUMNS if k != "images_per_s"}
    assert read_json(out, "comparison.json")["results"]["embedded"]["DINO"] == report["results"]["embedded"]["DINO"]
    status, err = run_main(compare.main, [*argv[:argv.index("--steps") + 1], "3", *argv[argv.index("--steps") + 2:]],
                           capsys)
    assert status == 2 and "other settings (steps)" in err[0], err


def test_cli_on_benchmark_checkpoints_matches_benchmark(tiny_benchmark, tmp_path):
    """`evaluate.py all` on a run's checkpoint.pth and on its exported backbone.pth (same seed)
    reproduces the benchmark's numbers."""
    out, _, _ = tiny_benchmark
    run_dir = compare.run_folder(out, "embedded", "iBOT", 0)
    expected = read_json(run_dir, "evaluation.json")
    sizes = ["--train-images", "96", "--test-images", "48"]
    with small_embedded():
        assert evaluate.main(["all", os.path.join(run_dir, "checkpoint.pth"), *sizes, "--out", str(tmp_path / "a.json")]) == 0
        assert evaluate.main(["knn", os.path.join(run_dir, "backbone.pth"), "--seed", "0", *sizes]) == 0
    result = read_json(tmp_path / "a.json")
    for metric in ("knn_top1_k10", "knn_top1_k20", "linear_top1", "linear_top1_cls_avgpool", "dense_miou",
                   "dense_pixel_acc"):
        assert result[metric] == expected[metric], metric
    assert read_json(run_dir, "knn-embedded.json")["knn_top1_k20"] == expected["knn_top1_k20"]


