"""Evaluate frozen backbones from train_ddp.py, and the equal-budget benchmark of PQCL.

    python evaluate.py knn runs/embedded/checkpoint.pth          # -> runs/embedded/knn-embedded.json
    python evaluate.py linear runs/fm/backbone.pth --data fashion-mnist
    python evaluate.py dense runs/embedded/checkpoint.pth        # embedded only: it has label maps
    python evaluate.py all runs/embedded/checkpoint.pth --out eval.json   # every protocol, one forward pass
    python evaluate.py all pixels --data fashion-mnist           # raw-pixel baseline
    python evaluate.py all random --seed 1                       # random init of the preset architecture
    python evaluate.py benchmark --seeds 0 1 2 --out results/    # the table: ~1 h on 2 CPU cores
    python evaluate.py benchmark --seeds 0 --steps 3 --out /tmp/smoke -- --batch-size 16   # a smoke test

The backbone is a checkpoint.pth or an exported backbone.pth of train_ddp.py (its frozen
teacher), `pixels` (the raw pixels in [0, 1] as features) or `random` (the built-in preset's
architecture, initialised as train_ddp.py would with --seed). Each command writes one JSON.

Protocols (pure functions below: features in, numbers out)
    knn     weighted k-NN of DINO: cosine similarity of l2-normalised [CLS] features, the
            k = 10 and k = 20 nearest training images vote with weight exp(sim / 0.07).
    linear  a linear classifier on frozen features: [CLS], and [CLS] concatenated with the
            average of the patch tokens (DINO's --avgpool_patchtokens). Features are extracted once
            from whole images (no augmentation), standardised with the training split's mean
            and std (MAE's BatchNorm without affine), then a zero-initialised linear layer is
            fitted by AdamW (lr 1e-2 cosine to 0, weight decay 1e-4) on the cross-entropy:
            100 epochs of batch 256. Top-1 on the test split.
    dense   the same linear probe on each frozen patch token (5 epochs of batch 1024), trained to
            predict the majority label of its P x P pixels (ties go to the lower label, background),
            evaluated at pixel resolution: patch logits bilinearly upsampled to S x S, argmax,
            against the embedded dataset's label maps (0 = background, 1 + class on the shape).
            mIoU over the classes present in the test maps (background included), pixel accuracy.
The raw-pixel row uses the flattened image for knn/linear and each patch's 3 P^2 pixels for dense.

Benchmark: DINO, iBOT, PQCL-DINO and PQCL-iBOT (train_ddp.py --framework dino|ibot
--query-weight 0|1) with the same architecture, schedules and budget (the built-in preset,
train_ddp.EMBEDDED, read at run time), per seed the same data order and views, on the
embedded dataset and Fashion-MNIST; then every protocol on each teacher, a random init and
the raw pixels. The budget is --steps optimizer steps per run: the preset's epochs over the
first steps/epochs batches of the training split, so every schedule (warm-ups, cosine decays)
runs to its end. Runs are resumable: rerun the same command and finished pretrainings and
evaluations are skipped, an interrupted pretraining continues from its last checkpoint.
Arguments after `--` go to every pretraining run (e.g. `-- --batch-size 16`).
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import pqcl
import train_ddp
from train_ddp import UsageError

KNN_KS, KNN_TEMPERATURE = (10, 20), 0.07  # DINO's k-NN protocol
LINEAR_RECIPE = dict(epochs=100, batch_size=256, lr=1e-2, weight_decay=1e-4)  # ~100% on separable features
DENSE_RECIPE = dict(LINEAR_RECIPE, epochs=5, batch_size=1024)  # N samples per image: 6000 x 64 patches, 1900 steps
SPECIAL_BACKBONES = ("pixels", "random")
PROTOCOLS = ("knn", "linear", "dense")

# --------------------------------------------------------------------------------------
# Features: frozen tokens of a backbone, or raw pixels
# --------------------------------------------------------------------------------------


def backbone_features(backbone, images, keep_patches):
    """uint8 images (n, 3, S, S) -> {"image": [CLS] (n, D), "cls_avgpool": [CLS] and the mean
    patch token (n, 2D), "patches": (n, N, D) row-major if keep_patches}."""
    image, cls_avgpool, patches = [], [], []
    for tokens in train_ddp.frozen_tokens(backbone, images):  # (c, 1 + N, D)
        image.append(tokens[:, 0])
        cls_avgpool.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1))
        if keep_patches:
            patches.append(tokens[:, 1:])
    features = {"image": torch.cat(image), "cls_avgpool": torch.cat(cls_avgpool)}
    if keep_patches:
        features["patches"] = torch.cat(patches)
    return features


def pixel_features(images, patch_size, keep_patches):
    """uint8 images (n, 3, S, S) -> {"image": all pixels in [0, 1] (n, 3 S^2), "patches": each
    patch's pixels (n, N, 3 P^2), patches row-major as a ViT's tokens, if keep_patches}."""
    pixels = images.float() / 255
    features = {"image": pixels.flatten(1)}
    if keep_patches:
        features["patches"] = F.unfold(pixels, patch_size, stride=patch_size).transpose(1, 2)  # (n, N, 3 P^2)
    return features


# --------------------------------------------------------------------------------------
# Protocols: pure functions of features and labels
# --------------------------------------------------------------------------------------


def knn_scores(train_features, train_labels, test_features, test_labels, ks=KNN_KS, temperature=KNN_TEMPERATURE):
    """Weighted k-NN top-1 (percent) for each k, on l2-normalised features (n, D), (m, D)."""
    train_features, test_features = F.normalize(train_features, dim=-1), F.normalize(test_features, dim=-1)
    return {f"knn_top1_k{k}": train_ddp.knn_top1(train_features, train_labels, test_features, test_labels, k,
                                                 temperature) for k in ks}


class LinearProbe(nn.Module):
    """Standardise with fixed statistics (mean, std of the training features), then one linear layer."""

    def __init__(self, mean, std, num_classes):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(len(mean), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features):  # (n, D) -> logits (n, C)
        return self.linear((features - self.mean) / self.std)


def fit_linear_probe(features, labels, num_classes, epochs, batch_size, lr, weight_decay, seed):
    """Frozen features (n, D), labels (n,) in [0, num_classes) -> a LinearProbe fitted by AdamW
    on the cross-entropy, lr cosine from `lr` to 0 per step; data order seeded by `seed`."""
    probe = LinearProbe(features.mean(0), features.std(0) + 1e-6, num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    for epoch in range(epochs):
        for i, batch in enumerate(torch.randperm(len(features), generator=order_rng).split(batch_size)):
            optimizer.param_groups[0]["lr"] = pqcl.cosine_schedule(epoch * steps_per_epoch + i,
                                                                   epochs * steps_per_epoch, lr, 0.0)
            loss = F.cross_entropy(probe(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe.eval()


def linear_top1(train_features, train_labels, test_features, test_labels, seed=0, recipe=LINEAR_RECIPE):
    """Top-1 (percent) of a linear probe fitted on the training features, on the test features."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = fit_linear_probe(train_features, train_labels, num_classes, seed=seed, **recipe)
    with torch.no_grad():
        predictions = torch.cat([probe(chunk).argmax(1) for chunk in test_features.split(4096)])
    return 100.0 * (predictions == test_labels).float().mean().item()


def patch_majority_labels(label_maps, patch_size, num_classes):
    """Label maps (n, S, S) -> (n, N) the most frequent label in each P x P patch, row-major;
    ties go to the lowest label."""
    patches = label_maps.long().unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)  # (n, G, G, P, P)
    counts = F.one_hot(patches.flatten(3), num_classes).sum(3)  # (n, G, G, C)
    return counts.argmax(-1).flatten(1)  # argmax returns the first maximum


def confusion_matrix(predictions, targets, num_classes):
    """(...) integer predictions and targets -> (C, C) counts, rows = target, columns = prediction."""
    pairs = targets.flatten().long() * num_classes + predictions.flatten().long()
    return torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_scores(confusion):
    """(C, C) confusion -> mIoU (percent, over the classes present in the targets) and pixel accuracy."""
    confusion = confusion.double()
    true_positives, target_counts, predicted_counts = confusion.diag(), confusion.sum(1), confusion.sum(0)
    iou = true_positives / (target_counts + predicted_counts - true_positives).clamp(min=1)  # (C,)
    present = target_counts > 0
    return {"dense_miou": 100.0 * iou[present].mean().item(),
            "dense_pixel_acc": 100.0 * (true_positives.sum() / confusion.sum()).item()}


def dense_scores(train_patches, train_maps, test_patches, test_maps, seed=0, recipe=DENSE_RECIPE):
    """Linear per-patch probe. Patch features (n, N, D), (m, N, D); label maps (n, S, S), (m, S, S)
    -> mIoU and pixel accuracy at pixel resolution (patch logits upsampled bilinearly)."""
    size, grid = train_maps.shape[-1], math.isqrt(train_patches.shape[1])
    num_classes = int(max(train_maps.max(), test_maps.max())) + 1
    targets = patch_majority_labels(train_maps, size // grid, num_classes)  # (n, N)
    probe = fit_linear_probe(train_patches.flatten(0, 1), targets.flatten(), num_classes, seed=seed, **recipe)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for patches, maps in zip(test_patches.split(256), test_maps.split(256)):
            logits = probe(patches.flatten(0, 1)).unflatten(0, (len(patches), grid, grid))  # (c, G, G, C)
            logits = logits.permute(0, 3, 1, 2)  # (c, C, G, G)
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)  # (c, C, S, S)
            confusion += confusion_matrix(logits.argmax(1), maps, num_classes)
    return segmentation_scores(confusion)


def run_protocols(protocols, train, test, seed=0):
    """train, test: (features dict, labels (n,), label maps (n, S, S) or None) -> {metric: number}."""
    (train_features, train_labels, train_maps), (test_features, test_labels, test_maps) = train, test
    results = {}
    if "knn" in protocols:
        results.update(knn_scores(train_features["image"], train_labels, test_features["image"], test_labels))
    if "linear" in protocols:
        results["linear_top1"] = linear_top1(train_features["image"], train_labels, test_features["image"],
                                             test_labels, seed)
        if "cls_avgpool" in train_features:
            results["linear_top1_cls_avgpool"] = linear_top1(train_features["cls_avgpool"], train_labels,
                                                             test_features["cls_avgpool"], test_labels, seed)
    if "dense" in protocols:
        results.update(dense_scores(train_features["patches"], train_maps, test_features["patches"], test_maps, seed))
    return results


# --------------------------------------------------------------------------------------
# Backbones and data
# --------------------------------------------------------------------------------------


def preset_config(data, seed, train_args=()):
    """The pqcl.Config that `train_ddp.py --data <data> --seed <seed> <train_args>` would use."""
    return train_ddp.config_from_args(train_ddp.build_parser().parse_args([*train_args, "--data", data,
                                                                           "--seed", str(seed)]))


def random_backbone(cfg):
    """The teacher backbone a run with `cfg` starts from (seeded as train_ddp.py seeds it)."""
    torch.manual_seed(cfg.seed)
    return pqcl.PQCL(cfg).teacher.backbone.eval()


def load_backbone(spec, data, seed):
    """'pixels', 'random' or a checkpoint path -> (backbone or None for pixels, img_size, patch_size,
    the seed of the data: `seed` if given, else the checkpoint's pretraining seed, else 0)."""
    if spec in SPECIAL_BACKBONES:
        cfg = preset_config(data, 0 if seed is None else seed)
        return (random_backbone(cfg) if spec == "random" else None), cfg.img_size, cfg.patch_size, cfg.seed
    if not os.path.isfile(spec):
        raise UsageError(f"{spec}: no such file; pass a checkpoint.pth or backbone.pth written by train_ddp.py, "
                         "or 'pixels' or 'random'")
    backbone, cfg = train_ddp.backbone_from_checkpoint(spec)
    grid = math.isqrt(backbone.pos_embed.shape[1] - 1)
    seed = seed if seed is not None else (cfg.seed if cfg else 0)
    return backbone, grid * backbone.patch_size, backbone.patch_size, seed


def first(splits, train_images, test_images):
    """A built-in set's (train, test), each (images (n, 3, S, S) uint8, labels (n,), label maps
    (n, S, S) or None), cut to their first train_images / test_images samples (0: all)."""
    return tuple(tuple(part[:count or None] if part is not None else None for part in split)
                 for split, count in zip(splits, (train_images, test_images)))


def all_protocols(splits):
    """Every protocol the data allow: the dense probe needs label maps."""
    return PROTOCOLS if splits[0][2] is not None else ("knn", "linear")


def evaluate(backbone, patch_size, splits, protocols, seed):
    """Every protocol in `protocols` on one backbone (None: raw pixels), features extracted once."""
    if "dense" in protocols and splits[0][2] is None:
        raise UsageError("the dense probe needs per-pixel label maps, which only --data embedded has")
    keep_patches = "dense" in protocols
    split_features = []
    for images, labels, label_maps in splits:
        features = (pixel_features(images, patch_size, keep_patches) if backbone is None
                    else backbone_features(backbone, images, keep_patches))
        split_features.append((features, labels, label_maps))
    return run_protocols(protocols, *split_features, seed=seed)


# --------------------------------------------------------------------------------------
# The equal-budget benchmark
# --------------------------------------------------------------------------------------

METHODS = {  # row -> train_ddp.py flags; everything else is shared
    "DINO": ["--framework", "dino", "--query-weight", "0"],
    "iBOT": ["--framework", "ibot", "--query-weight", "0"],
    "PQCL-DINO": ["--framework", "dino", "--query-weight", "1"],
    "PQCL-iBOT": ["--framework", "ibot", "--query-weight", "1"],
}
BASELINES = ("random init", "raw pixels")
COLUMNS = {  # metric -> table header
    "knn_top1_k20": "k-NN top-1 (k=20)", "knn_top1_k10": "k-NN top-1 (k=10)",
    "linear_top1": "linear top-1 [CLS]", "linear_top1_cls_avgpool": "linear top-1 [CLS]+avg",
    "dense_miou": "dense mIoU", "dense_pixel_acc": "dense pixel acc.", "images_per_s": "pretrain img/s",
}
BENCHMARK_FLAGS = ("data", "seed", "framework", "query_weight", "subset", "output_dir", "resume", "max_steps",
                   "eval", "export")  # train_ddp.py settings the benchmark makes itself


class BenchmarkStopped(Exception):
    """A pretraining run failed or was stopped; carries train_ddp.py's exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def run_folder(out, data, row, seed):
    return os.path.join(out, data, row.lower().replace(" ", "-"), f"seed{seed}")


def pretrain(run_dir, data, seed, method_flags, subset, train_args):
    """One pretraining run of train_ddp.py in this process; continues an interrupted one."""
    argv = [*train_args, "--data", data, "--seed", str(seed), *method_flags, "--subset", str(subset),
            "--output-dir", run_dir, "--no-eval", "--log-every", "10"]
    if os.path.exists(os.path.join(run_dir, "checkpoint.pth")):
        argv.append("--resume")
    status = train_ddp.main(argv)  # on SIGTERM it checkpoints, returns 0 and leaves no backbone.pth
    if status != 0:
        raise BenchmarkStopped(f"pretraining {run_dir} failed (train_ddp.py exit {status}, reason above); "
                               "fix it and rerun the same command to resume", status)
    if not os.path.exists(os.path.join(run_dir, "backbone.pth")):
        raise BenchmarkStopped(f"pretraining {run_dir} was stopped; rerun the same command to resume", 1)


def benchmark_backbone(row, run_dir, data, seed, cfg, subset, train_args, result):
    """The frozen backbone of one table row (None: raw pixels), pretrained first if it is a method
    whose run has not finished; records the run's throughput and config in `result`."""
    if row == "raw pixels":
        return None
    if row == "random init":
        return random_backbone(dataclasses.replace(cfg, seed=seed))
    if not os.path.exists(os.path.join(run_dir, "backbone.pth")):
        start = time.perf_counter()
        pretrain(run_dir, data, seed, METHODS[row], subset, train_args)
        result["pretrain_s"] = time.perf_counter() - start  # this invocation's part of it
    result["images_per_s"] = median_images_per_s(run_dir)
    backbone, run_cfg = train_ddp.backbone_from_checkpoint(os.path.join(run_dir, "checkpoint.pth"))
    result["config"] = dataclasses.asdict(run_cfg)
    return backbone


def median_images_per_s(run_dir):
    """Pretraining throughput: the median over log.jsonl's intervals (robust to warm-up and resumes)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return statistics.median(json.loads(line)["images_per_s"] for line in f)


def mean_std(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def summarize(results):
    """{row: [evaluation per seed]} -> {row: {metric: {mean, std (sample, over seeds), values}}}."""
    return {row: {metric: mean_std([run[metric] for run in runs]) for metric in COLUMNS if metric in runs[0]}
            for row, runs in results.items()}


def markdown_table(summary):
    """One dataset's summary -> a markdown table, mean +- std over seeds."""
    columns = [metric for metric in COLUMNS if any(metric in metrics for metrics in summary.values())]

    def cell(stats):
        if stats is None:
            return "-"
        return f"{stats['mean']:.1f}" + (f" ± {stats['std']:.1f}" if stats["std"] is not None else "")

    lines = ["| method | " + " | ".join(COLUMNS[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(metrics.get(c)) for c in columns) + " |"
              for row, metrics in summary.items()]
    return "\n".join(lines)


def check_settings(out, settings):
    """A results folder holds one budget: refuse to mix runs made with other settings."""
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = ", ".join(k for k in settings if previous.get(k) != settings[k])
            raise UsageError(f"{out} holds a benchmark made with other settings ({changed}); rerun with the same "
                             "flags to resume it, or pass another --out")
    else:
        os.makedirs(out, exist_ok=True)
        train_ddp.save_atomic_json(settings, path)


def benchmark(args, train_args, command):
    """Pretrain and evaluate every method, seed and dataset; write benchmark.md and benchmark.json."""
    start = time.perf_counter()
    settings = {"steps": args.steps, "train_args": train_args, "train_images": args.train_images,
                "test_images": args.test_images}
    configs = {data: preset_config(data, args.seeds[0], train_args) for data in args.datasets}
    loaded = {}  # (data, seed) -> eval splits; the first seed's now, so a missing dataset fails before hours of work
    for data, cfg in configs.items():
        splits = train_ddp.BUILTIN_DATASETS[data](args.seeds[0], cfg.img_size)
        images_per_epoch = math.ceil(args.steps / cfg.epochs) * cfg.batch_size
        if images_per_epoch > len(splits[0][0]):
            raise UsageError(f"--steps {args.steps}: {cfg.epochs} epochs of {images_per_epoch} images exceed the "
                             f"{len(splits[0][0])} training images of {data}; lower --steps or pass more epochs "
                             "after '--' (-- --epochs E)")
        loaded[data, args.seeds[0]] = first(splits, args.train_images, args.test_images)
    check_settings(args.out, settings)
    rows = [*METHODS, *BASELINES]
    total, done, resumed = len(args.datasets) * len(args.seeds) * len(rows), 0, 0
    results = {data: {row: [] for row in rows} for data in args.datasets}
    for data in args.datasets:
        cfg = configs[data]
        steps_per_epoch = math.ceil(args.steps / cfg.epochs)
        subset = steps_per_epoch * cfg.batch_size  # images per epoch; the preset's epochs run in full
        for seed in args.seeds:
            splits = loaded.pop((data, seed), None)  # loaded once per (dataset, seed), when first needed
            for row in rows:
                done += 1
                run_dir = run_folder(args.out, data, row, seed)
                result_path = os.path.join(run_dir, "evaluation.json")
                elapsed = train_ddp.format_duration(time.perf_counter() - start)
                if os.path.exists(result_path):
                    with open(result_path) as f:
                        results[data][row].append(json.load(f))
                    resumed += 1
                    print(f"[{done}/{total} {elapsed}] {data} seed {seed} {row}: done before", flush=True)
                    continue
                print(f"[{done}/{total} {elapsed}] {data} seed {seed} {row}", flush=True)
                row_start = time.perf_counter()
                result = {"row": row, "data": data, "seed": seed}
                backbone = benchmark_backbone(row, run_dir, data, seed, cfg, subset, train_args, result)
                if splits is None:
                    splits = first(train_ddp.BUILTIN_DATASETS[data](seed, cfg.img_size), args.train_images,
                                   args.test_images)
                eval_start = time.perf_counter()
                result.update(evaluate(backbone, cfg.patch_size, splits, all_protocols(splits), seed))
                result.update(eval_s=time.perf_counter() - eval_start, train_images=len(splits[0][0]),
                              test_images=len(splits[1][0]))
                os.makedirs(run_dir, exist_ok=True)
                train_ddp.save_atomic_json(result, result_path)
                results[data][row].append(result)
                print(f"    {', '.join(f'{k} {result[k]:.1f}' for k in COLUMNS if k in result)} "
                      f"({train_ddp.format_duration(time.perf_counter() - row_start)})", flush=True)
    report = {"command": command, "date": datetime.date.today().isoformat(), "seeds": args.seeds,
              "settings": settings, "wall_s": time.perf_counter() - start, "rows_done_before": resumed,
              "rows_s": sum(run.get("pretrain_s", 0.0) + run["eval_s"]  # every invocation's pretraining + evaluation
                            for rows in results.values() for runs in rows.values() for run in runs),
              "configs": {data: dataclasses.asdict(cfg) for data, cfg in configs.items()},
              "results": {data: summarize(results[data]) for data in args.datasets}}
    write_report(report, args.out)
    return report


def write_report(report, out):
    """benchmark.json, and benchmark.md: the budget, then one table per dataset."""
    train_ddp.save_atomic_json(report, os.path.join(out, "benchmark.json"))
    cfg = pqcl.Config(**next(iter(report["configs"].values())))
    steps_per_epoch = math.ceil(report["settings"]["steps"] / cfg.epochs)
    lines = [f"Equal-budget benchmark, {report['date']}: `{report['command']}`", "",
             f"{cfg.arch} depth {cfg.depth or pqcl.ARCHS[cfg.arch][1]}, patch {cfg.patch_size}, {cfg.img_size} px; "
             f"per run {cfg.epochs} epochs x {steps_per_epoch} steps of batch {cfg.batch_size} "
             f"({cfg.epochs * steps_per_epoch * cfg.batch_size} images seen); mean ± sample std over seeds "
             f"{', '.join(map(str, report['seeds']))}. Pretraining + evaluation of all rows took "
             f"{train_ddp.format_duration(report['rows_s'])}; this invocation "
             f"{train_ddp.format_duration(report['wall_s'])}"
             + (f" ({report['rows_done_before']} rows evaluated before)" if report["rows_done_before"] else "") + "."]
    for data, summary in report["results"].items():
        lines += ["", f"**{data}**", "", markdown_table(summary)]
    with open(os.path.join(out, "benchmark.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser():
    parser = train_ddp.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{knn,linear,dense,all,benchmark}")
    eval_sizes = argparse.ArgumentParser(add_help=False)
    eval_sizes.add_argument("--train-images", type=int, default=10_000,
                            help="fit k-NN and probes on the first N training images (0: all; Fashion-MNIST has 60000)")
    eval_sizes.add_argument("--test-images", type=int, default=0, help="score on the first N test images (0: all)")
    for name in (*PROTOCOLS, "all"):
        command = commands.add_parser(name, parents=[eval_sizes], help=f"{name} protocol(s) on one backbone")
        command.add_argument("backbone", help="checkpoint.pth or backbone.pth from train_ddp.py, 'pixels' or 'random'")
        command.add_argument("--data", choices=sorted(train_ddp.BUILTIN_DATASETS), default="embedded")
        command.add_argument("--seed", type=int, default=None,
                             help="seed of the embedded dataset, the probes and 'random' (default: the checkpoint's "
                                  "pretraining seed, else 0)")
        command.add_argument("--out", help="JSON file (default: <protocol>-<data>.json next to the checkpoint, "
                                           "or <backbone>-<protocol>-<data>.json here)")
    bench = commands.add_parser("benchmark", parents=[eval_sizes], help="the equal-budget table (see above)")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--datasets", nargs="+", choices=sorted(train_ddp.BUILTIN_DATASETS),
                       default=["embedded", "fashion-mnist"])
    bench.add_argument("--steps", type=int, default=128,
                       help="optimizer steps per pretraining run (same for every method): the preset's epochs over "
                            "the first ceil(steps / epochs) batches of the training split; at 128 the 36-row table "
                            "took 62 minutes on 2 CPU cores")
    bench.add_argument("--out", default="results", help="folder for the runs, benchmark.md and benchmark.json")
    return parser


def check_args(args, train_args):
    if args.train_images < 0 or args.test_images < 0:
        raise UsageError("--train-images / --test-images: must be >= 0 (0: all)")
    if 0 < args.train_images < max(KNN_KS):
        raise UsageError(f"--train-images {args.train_images}: the k-NN needs at least {max(KNN_KS)} training images")
    if args.command == "benchmark":
        if args.steps < 1:
            raise UsageError(f"--steps {args.steps}: must be >= 1")
        if len(set(args.seeds)) != len(args.seeds):
            raise UsageError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated; give each once")
        parser = train_ddp.build_parser()
        given, defaults = parser.parse_args(train_args), parser.parse_args([])
        clash = ["--" + name.replace("_", "-") for name in BENCHMARK_FLAGS
                 if getattr(given, name) != getattr(defaults, name)]
        if clash:
            raise UsageError(f"{', '.join(clash)} after '--': the benchmark sets these itself; use its own flags")
    elif train_args:
        raise UsageError(f"'-- {' '.join(train_args)}': only the benchmark passes arguments on to train_ddp.py")


def default_out(args):
    if args.backbone in SPECIAL_BACKBONES:
        return f"{args.backbone}-{args.command}-{args.data}.json"
    return os.path.join(os.path.dirname(args.backbone), f"{args.command}-{args.data}.json")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own_args, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    try:
        args = build_parser().parse_args(own_args)
        check_args(args, train_args)
        if args.command == "benchmark":
            benchmark(args, train_args, "python evaluate.py " + shlex.join(argv))
            return 0
        start = time.perf_counter()
        backbone, img_size, patch_size, seed = load_backbone(args.backbone, args.data, args.seed)
        if backbone is not None:
            backbone.to("cuda" if torch.cuda.is_available() else "cpu")
        splits = first(train_ddp.BUILTIN_DATASETS[args.data](seed, img_size), args.train_images, args.test_images)
        protocols = all_protocols(splits) if args.command == "all" else (args.command,)
        result = {"backbone": args.backbone, "data": args.data, "seed": seed, "train_images": len(splits[0][0]),
                  "test_images": len(splits[1][0]), "knn_temperature": KNN_TEMPERATURE,
                  **evaluate(backbone, patch_size, splits, protocols, seed)}
        result["seconds"] = time.perf_counter() - start
        out = args.out or default_out(args)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        train_ddp.save_atomic_json(result, out)
        print(", ".join(f"{k} {v:.2f}" for k, v in result.items() if k in COLUMNS) + f" -> {out}")
        return 0
    except UsageError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    except BenchmarkStopped as error:
        print(f"evaluate.py: {error}", file=sys.stderr)
        return error.status


if __name__ == "__main__":
    sys.exit(main())
