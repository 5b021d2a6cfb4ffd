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
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
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
    assert evaluate.knn_scores(train, train_labels, test, reference, (k,), 0.07, chunk=7) == {f"knn_top1_k{k}": 100.0}
    assert evaluate.knn_scores(train, train_labels, test, (reference + 1) % 4, (k,), 0.07, chunk=7) == \
        {f"knn_top1_k{k}": 0.0}


def test_knn_top5_and_several_k_match_brute_force():
    """knn_correct's top-5 counts (k = 3, 10, 30 from one search of the 30 nearest, chunk 5)
    against the loop's full ranking of the votes: label = the loop's 5th choice is a top-5 hit,
    the 6th is not."""
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 8, generator=gen), torch.randn(23, 8, generator=gen)
    train_labels = torch.randint(7, (60,), generator=gen)
    ks = (3, 10, 30)
    unit_train, unit_test = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    for row, k in enumerate(ks):
        for choice, hit in ((4, True), (5, False)):
            labels = []
            for query in test:
                sims = (train @ query / (train.norm(dim=1) * query.norm())).tolist()
                votes = collections.defaultdict(float)
                for i in sorted(range(60), key=lambda i: -sims[i])[:k]:
                    votes[int(train_labels[i])] += math.exp(sims[i] / 0.07)
                ranking = sorted(range(7), key=lambda c: -votes.get(c, 0.0))  # unvoted classes last
                labels.append(ranking[choice] if choice < len(votes) else -1)
            labels = torch.tensor(labels)
            correct = evaluate.knn_correct(unit_train, train_labels, unit_test, labels, ks, 0.07, 7, chunk=5)
            assert correct[row, 1] == ((labels >= 0).sum() if hit else 0), (k, choice)


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
    (evaluate.main, ["linear", "pixels", "--data", "imagenet"], "--data imagenet: neither a built-in set"),
    (evaluate.main, ["knn", "pixels", "--train-images", "5"], "--train-images 5"),
    (evaluate.main, ["knn", "pixels", "--", "--depth", "1"], "unrecognized arguments"),
    (compare.main, ["--steps", "0"], "--steps 0"),
    (compare.main, ["--steps", "embedded=-3"], "--steps embedded=-3"),
    (compare.main, ["--steps", "mnist=10"], "no dataset 'mnist'"),
    (compare.main, ["--steps", "embedded=10"], "no budget for fashion-mnist"),
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


# 2 steps of batch 16 per run (one epoch over 32 images; 4 on Fashion-MNIST: each dataset its own budget),
# a one-block ViT, small heads, probes on 96 / 48 images
TINY_BENCHMARK = ["--seeds", "0", "--steps", "2", "fashion-mnist=4", "--train-images", "96", "--test-images", "48", "--",
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
        assert checkpoint["step"] == {"embedded": 2, "fashion-mnist": 4}[dataset]
        configs.append({k: v for k, v in checkpoint["config"].items() if k not in ("framework", "query_weight", "query_as_local")})
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
    assert sum(line.endswith(": done before") for line in printed.splitlines()) == len(BENCHMARK_DATASETS) * (len(compare.METHODS) + len(compare.BASELINES)) - 1
    after = read_json(run_dir, "evaluation.json")
    assert {k: after[k] for k in compare.COLUMNS if k != "images_per_s"} == \
           {k: before[k] for k in compare.COLUMNS if k != "images_per_s"}
    assert read_json(out, "comparison.json")["results"]["embedded"]["DINO"] == report["results"]["embedded"]["DINO"]
    status, err = run_main(compare.main, [*argv[:argv.index("--steps") + 1], "3", *argv[argv.index("--steps") + 2:]],
                           capsys)
    assert status == 2 and "other settings (steps)" in err[0], err


def test_benchmark_invocations_share_a_folder(tiny_benchmark, tmp_path, capsys):
    """Two invocations with disjoint seeds in one folder (the README's one process per core), then
    one with both seeds: it trains nothing, and its table holds both seeds' rows as they were."""
    out, _, _ = tiny_benchmark
    shared = str(tmp_path / "shared")
    shutil.copytree(os.path.join(out, "embedded"), os.path.join(shared, "embedded"))  # seed 0, as if done by a first process
    assert TINY_BENCHMARK[:2] == ["--seeds", "0"]
    with small_embedded():
        assert compare.main(["--out", shared, "--datasets", "embedded", "--seeds", "1", *TINY_BENCHMARK[2:]]) == 0
        capsys.readouterr()
        assert compare.main(["--out", shared, "--datasets", "embedded", "--seeds", "0", "1", *TINY_BENCHMARK[2:]]) == 0
    printed = capsys.readouterr().out.splitlines()
    rows = len(compare.METHODS) + len(compare.BASELINES)
    assert sum(line.endswith(": done before") for line in printed) == 2 * rows
    report = read_json(shared, "comparison.json")
    for row in compare.METHODS:
        values = report["results"]["embedded"][row]["knn_top1_k20"]["values"]
        assert values == [read_json(compare.run_folder(shared, "embedded", row, seed), "evaluation.json")["knn_top1_k20"]
                          for seed in (0, 1)]
        assert values[0] == read_json(compare.run_folder(out, "embedded", row, 0), "evaluation.json")["knn_top1_k20"]


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


def test_paired_differences_by_hand():
    """PQCL row minus its baseline seed by seed; mean, sample std, standard error and the
    two-standard-error verdict computed by hand (3 seeds)."""
    def runs(*values):
        return [{"knn_top1_k20": v, "linear_top1": 50.0} for v in values]

    results = {"iBOT": runs(20.0, 22.0, 21.0), "PQCL-iBOT": runs(25.0, 26.0, 28.0), "DINO": runs(10.0, 10.0, 10.0),
               "PQCL-DINO": runs(11.0, 9.0, 10.0)}
    differences = compare.paired_differences(results)
    assert set(differences) == {"PQCL-iBOT - iBOT", "PQCL-DINO - DINO"}  # no iBOT + query-as-local row here
    ibot = differences["PQCL-iBOT - iBOT"]["knn_top1_k20"]
    deltas = [5.0, 4.0, 7.0]
    mean = sum(deltas) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2)
    assert ibot["values"] == deltas and ibot["mean"] == pytest.approx(mean) and ibot["std"] == pytest.approx(std)
    assert ibot["se"] == pytest.approx(std / math.sqrt(3)) and ibot["beyond_noise"]  # 5.33 > 2 x 0.88
    dino = differences["PQCL-DINO - DINO"]["knn_top1_k20"]
    assert dino["mean"] == pytest.approx(0.0) and not dino["beyond_noise"]
    assert differences["PQCL-iBOT - iBOT"]["linear_top1"]["std"] == 0.0
    assert not differences["PQCL-iBOT - iBOT"]["linear_top1"]["beyond_noise"]  # no difference is no effect


# --------------------------------------------------------------------------------------
# --data ROOT: DINO's protocols on ImageFolder trees, one process and torchrun
# --------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.abspath(__file__))
EVALUATE = os.path.join(REPO, "evaluate.py")
FOLDER_SIZE = 32  # the tiny backbone's resolution: 4 x 4 patches of 8 px
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def write_jpeg_folder(root, per_class=(7, 3), separable=False):
    """ROOT/train and ROOT/val with 3 classes of 40 x 48 JPEGs (21 and 9 images: shards of 2 ranks
    are unequal). separable: each class is noise around its own colour; else pure noise."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for label, colour in enumerate(COLOURS):
            os.makedirs(os.path.join(root, split, f"class{label}"), exist_ok=True)
            for i in range(count):
                pixels = (np.array(colour) + rng.normal(0, 40, (40, 48, 3))) if separable else rng.uniform(0, 255, (40, 48, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    os.path.join(root, split, f"class{label}", f"{i}.jpg"))
    return str(root)


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("noise"))


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("colours"), separable=True)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """An exported backbone.pth: a random 2-block ViT-Tiny at 32 px, patch 8."""
    torch.manual_seed(0)
    vit = randomize_(pqcl.build_backbone("vit_tiny", 2, img_size=FOLDER_SIZE, patch_size=8))
    path = str(tmp_path_factory.mktemp("backbone") / "backbone.pth")
    checkpoints.save_atomic(checkpoints.backbone_state(vit.state_dict()), path)
    return path


KNN_ARGS = ["--ks", "1", "5", "10", "--workers", "0", "--batch-size", "4"]
LINEAR_ARGS = ["--workers", "0", "--n-last-blocks", "2", "--lr", "2", "--val-every", "1"]


def torchrun(argv, processes=2):
    """`torchrun --nproc-per-node=2 evaluate.py ARGV` on gloo, one thread per process."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(processes), EVALUATE, *argv], capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def preprocessed_split(root, split):
    """Every image of ROOT/split through DINO's preprocessing, read independently of ImageFolder:
    (uint8 images (n, 3, S, S), labels (n,)), classes and files in sorted order."""
    images, labels = [], []
    for label, name in enumerate(sorted(os.listdir(os.path.join(root, split)))):
        for file in sorted(os.listdir(os.path.join(root, split, name))):
            with Image.open(os.path.join(root, split, name, file)) as image:
                images.append(data.eval_transform(FOLDER_SIZE)(image.convert("RGB")))
                labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def test_dino_preprocessing_resizes_the_short_side_and_crops_the_centre():
    """256/224 of the image size on the short side (bicubic), then the central S x S."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    resized = image.resize((44, 37), Image.BICUBIC)  # 32 * 256 / 224 = 36.6 -> 37 rows, 48 * 37 / 40 = 44.4 cols
    expected = torch.from_numpy(np.asarray(resized.crop((6, 2, 38, 34))).copy()).permute(2, 0, 1)
    assert torch.equal(data.eval_transform(32)(image), expected)


def test_image_folder_knn_equals_in_memory_knn(noise_folder, tiny_backbone, tmp_path):
    """`knn --data ROOT` reports the in-memory k-NN (knn_scores on backbone_features) of the same
    preprocessed images, top-1 for each k; the figures are not trivial (noise images)."""
    out = tmp_path / "knn.json"
    assert evaluate.main(["knn", tiny_backbone, "--data", noise_folder, *KNN_ARGS, "--out", str(out)]) == 0
    result = read_json(out)
    backbone, _ = checkpoints.backbone_from_checkpoint(tiny_backbone)
    (train_images, train_labels), (val_images, val_labels) = (preprocessed_split(noise_folder, s) for s in ("train", "val"))
    expected = evaluate.knn_scores(backbone_features_of(backbone, train_images), train_labels,
                                   backbone_features_of(backbone, val_images), val_labels, ks=(1, 5, 10))
    assert {k: result[k] for k in expected} == expected
    assert result["train_images"] == 21 and result["val_images"] == 9
    assert any(0 < value < 100 for value in expected.values()), expected
    assert all(result[f"knn_top5_k{k}"] == 100.0 for k in (1, 5, 10))  # 3 classes: all in the top 5


def backbone_features_of(backbone, images):
    return evaluate.backbone_features(backbone, images, keep_patches=False)["image"]


def test_image_folder_knn_under_torchrun_equals_one_process(noise_folder, tiny_backbone, tmp_path):
    """2 gloo processes, each extracting its shard (21 and 9 images: unequal shards), report
    exactly the 1-process figures."""
    argv = ["knn", tiny_backbone, "--data", noise_folder, *KNN_ARGS]
    assert evaluate.main([*argv, "--out", str(tmp_path / "one.json")]) == 0
    torchrun([*argv, "--out", str(tmp_path / "two.json")])
    one, two = read_json(tmp_path / "one.json"), read_json(tmp_path / "two.json")
    assert two["world_size"] == 2
    assert {k: v for k, v in one.items() if k.startswith("knn_top")} == {k: v for k, v in two.items()
                                                                         if k.startswith("knn_top")}


def probe_weights(out):
    return torch.load(evaluate.probe_checkpoint_path(str(out)), weights_only=True)["probe"]


def initial_probe(backbone_path, n_last_blocks=2, seed=0):
    torch.manual_seed(seed)
    probe = torch.nn.Linear(192 * n_last_blocks, 3)
    torch.nn.init.normal_(probe.weight, std=0.01)
    return probe.weight.detach()


def test_linear_under_torchrun_equals_one_process_on_the_same_global_batch(noise_folder, tiny_backbone, tmp_path):
    """2 processes x batch 4 == 1 process x batch 8 (same global batches, same per-sample
    augmentation): the probe's weights after 2 epochs of 2 steps agree to 1e-6, 1000 x below
    how far they moved; the validation figures are equal."""
    argv = ["linear", tiny_backbone, "--data", noise_folder, *LINEAR_ARGS, "--epochs", "2"]
    assert evaluate.main([*argv, "--batch-size", "8", "--out", str(tmp_path / "one.json")]) == 0
    torchrun([*argv, "--batch-size", "4", "--out", str(tmp_path / "two.json")])
    one, two = probe_weights(tmp_path / "one.json"), probe_weights(tmp_path / "two.json")
    moved = (one["weight"] - initial_probe(tiny_backbone)).abs().max()
    assert moved > 1e-3, moved
    assert_states_equal_within(one, two, atol=1e-6)
    assert read_json(tmp_path / "one.json")["history"] == read_json(tmp_path / "two.json")["history"]


def assert_states_equal_within(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0.0, msg=name)


class Killed(Exception):
    """Stands in for a kill right after a checkpoint was written."""


def test_linear_killed_then_resumed_equals_uninterrupted(noise_folder, tiny_backbone, tmp_path):
    """A probe killed after its first epoch's checkpoint and continued with --resume ends with the
    same weights, optimizer state and history as an uninterrupted run."""
    argv = ["linear", tiny_backbone, "--data", noise_folder, *LINEAR_ARGS, "--epochs", "3", "--batch-size", "8"]
    assert evaluate.main([*argv, "--out", str(tmp_path / "whole.json")]) == 0
    save = checkpoints.save_atomic

    def save_then_die(obj, path):
        save(obj, path)
        raise Killed

    with mock.patch.object(checkpoints, "save_atomic", side_effect=save_then_die), pytest.raises(Killed):
        evaluate.main([*argv, "--out", str(tmp_path / "cut.json")])
    assert not (tmp_path / "cut.json").exists()
    assert evaluate.main([*argv, "--out", str(tmp_path / "cut.json"), "--resume"]) == 0
    whole, cut = (torch.load(tmp_path / f"{name}.pth", weights_only=True) for name in ("whole", "cut"))
    assert whole["epoch"] == cut["epoch"] == 3
    assert_states_equal_within(whole["probe"], cut["probe"], atol=0.0)
    assert torch.equal(whole["optimizer"]["state"][0]["momentum_buffer"], cut["optimizer"]["state"][0]["momentum_buffer"])
    assert read_json(tmp_path / "whole.json")["history"] == read_json(tmp_path / "cut.json")["history"]


def test_linear_reaches_100_percent_on_separable_classes(colour_folder, tiny_backbone, tmp_path):
    """Classes of distinct colours are linearly separable in a random ViT's [CLS]: the probe
    (with the average-pooled patch tokens) classifies every validation image after 4 epochs,
    up from chance at its random initialisation."""
    out = tmp_path / "linear.json"
    assert evaluate.main(["linear", tiny_backbone, "--data", colour_folder, *LINEAR_ARGS, "--epochs", "4",
                          "--batch-size", "7", "--avgpool-patchtokens", "--out", str(out)]) == 0
    result = read_json(out)
    assert result["linear_top1"] == result["best_top1"] == 100.0, result["history"]
    assert [record["epoch"] for record in result["history"]] == [1, 2, 3, 4]


def break_folder(root, how):
    """A copy of a good ROOT broken one way."""
    write_jpeg_folder(root, per_class=(2, 1))
    if how == "no val":
        os.rename(root / "val", root / "validation")
    elif how == "other classes":
        os.rename(root / "val" / "class2", root / "val" / "dog")
    elif how == "empty class":
        for file in os.listdir(root / "train" / "class1"):
            os.remove(root / "train" / "class1" / file)
    return str(root)


@pytest.mark.parametrize("how,extra,says", [
    ("no val", [], "has no val/ folder"),
    ("other classes", [], "different class folders (only in train/: ['class2'], only in val/: ['dog'])"),
    ("empty class", [], "train/class1 holds no images"),
    ("good", ["--img-size", "30"], "--img-size 30: the checkpoint's patch size is 8; pick a multiple of it (e.g. 32)"),
    ("not pqcl", [], "not a PQCL checkpoint or backbone"),
    ("good", ["--resume"], "no checkpoint there"),
])
@pytest.mark.parametrize("command", ["knn", "linear"])
def test_bad_image_folder_input_is_one_line_exit_2_and_writes_nothing(command, how, extra, says, tiny_backbone,
                                                                      tmp_path, capsys):
    if command == "knn" and extra == ["--resume"]:
        pytest.skip("--resume is the linear probe's")
    root = break_folder(tmp_path / "root", how)
    backbone = tiny_backbone
    if how == "not pqcl":
        backbone = str(tmp_path / "resnet.pth")
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, backbone)
    out = tmp_path / "out" / "result.json"
    fits_the_tiny_folder = {"knn": ["--ks", "1"], "linear": ["--n-last-blocks", "1"]}[command]
    status, err = run_main(evaluate.main, [command, backbone, "--data", root, "--workers", "0", *fits_the_tiny_folder,
                                           *extra, "--out", str(out)], capsys)
    assert status == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "out").exists()
