"""Evaluate frozen backbones from train_ddp.py: k-NN, linear and dense probes.

    python evaluate.py knn runs/embedded/checkpoint.pth          # -> runs/embedded/knn-embedded.json
    python evaluate.py linear runs/fm/backbone.pth --data fashion-mnist
    python evaluate.py dense runs/embedded/checkpoint.pth        # embedded only: it has label maps
    python evaluate.py all runs/embedded/checkpoint.pth --out eval.json   # every protocol, one forward pass
    python evaluate.py all pixels --data fashion-mnist           # raw-pixel baseline
    python evaluate.py all random --seed 1                       # random init of the preset architecture

The backbone is a checkpoint.pth or an exported backbone.pth of train_ddp.py (its frozen
teacher), `pixels` (the raw pixels in [0, 1] as features) or `random` (the built-in preset's
architecture, initialised as train_ddp.py would with --seed). Each command writes one JSON.
This module is the one implementation of each protocol: train_ddp.py's eval.json and
compare.py's table use it too.

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
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import data
import pqcl
from data import UsageError

KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO's k-NN protocol; training's eval.json reports k = 20
KNN_KS = (10, KNN_K)
LINEAR_RECIPE = dict(epochs=100, batch_size=256, lr=1e-2, weight_decay=1e-4)  # ~100% on separable features
DENSE_RECIPE = dict(LINEAR_RECIPE, epochs=5, batch_size=1024)  # N samples per image: 6000 x 64 patches, 1900 steps
SPECIAL_BACKBONES = ("pixels", "random")
PROTOCOLS = ("knn", "linear", "dense")
METRICS = {  # what the protocols report -> a table header
    "knn_top1_k20": "k-NN top-1 (k=20)", "knn_top1_k10": "k-NN top-1 (k=10)",
    "linear_top1": "linear top-1 [CLS]", "linear_top1_cls_avgpool": "linear top-1 [CLS]+avg",
    "dense_miou": "dense mIoU", "dense_pixel_acc": "dense pixel acc.",
}

# --------------------------------------------------------------------------------------
# Features: frozen tokens of a backbone, or raw pixels
# --------------------------------------------------------------------------------------


@torch.no_grad()
def frozen_tokens(backbone, images, batch_size=256):
    """uint8 images (n, 3, S, S) -> all output tokens of a frozen backbone, one chunk at a
    time: yields float32 CPU tensors (c, 1 + N, D), c <= batch_size."""
    device = next(backbone.parameters()).device
    mean = torch.tensor(pqcl.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pqcl.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for chunk in images.split(batch_size):
        yield backbone((chunk.to(device).float() / 255 - mean) / std).float().cpu()


def backbone_features(backbone, images, keep_patches):
    """uint8 images (n, 3, S, S) -> {"image": [CLS] (n, D), "cls_avgpool": [CLS] and the mean
    patch token (n, 2D), "patches": (n, N, D) row-major if keep_patches}."""
    image, cls_avgpool, patches = [], [], []
    for tokens in frozen_tokens(backbone, images):  # (c, 1 + N, D)
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


def knn_top1(train_features, train_labels, test_features, test_labels, k=KNN_K, temperature=KNN_TEMPERATURE,
             chunk=1024):
    """The weighted vote (DINO) on l2-normalised features (n, D), (m, D): cosine similarity to
    the k nearest training features, votes weighted by exp(sim / T); top-1 accuracy in
    percent. Chunked over the test set."""
    num_classes = int(train_labels.max()) + 1
    correct = 0
    for features, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        sims, neighbours = (features @ train_features.T).topk(k, dim=1)  # (c, k)
        votes = torch.zeros(len(features), num_classes).scatter_add_(
            1, train_labels[neighbours], (sims / temperature).exp())
        correct += (votes.argmax(1) == labels).sum().item()
    return 100.0 * correct / len(test_labels)


def knn_scores(train_features, train_labels, test_features, test_labels, ks=KNN_KS, temperature=KNN_TEMPERATURE):
    """Weighted k-NN top-1 (percent) for each k, features (n, D), (m, D) l2-normalised here."""
    train_features, test_features = F.normalize(train_features, dim=-1), F.normalize(test_features, dim=-1)
    return {f"knn_top1_k{k}": knn_top1(train_features, train_labels, test_features, test_labels, k, temperature)
            for k in ks}


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


def random_backbone(cfg):
    """The teacher backbone a run with `cfg` starts from (seeded as train_ddp.py seeds it)."""
    torch.manual_seed(cfg.seed)
    return pqcl.PQCL(cfg).teacher.backbone.eval()


def load_backbone(spec, dataset, seed):
    """'pixels', 'random' or a checkpoint path -> (backbone or None for pixels, img_size, patch_size,
    the seed of the data: `seed` if given, else the checkpoint's pretraining seed, else 0)."""
    if spec in SPECIAL_BACKBONES:
        cfg = data.preset_config(data.default_preset(dataset), seed=0 if seed is None else seed)
        return (random_backbone(cfg) if spec == "random" else None), cfg.img_size, cfg.patch_size, cfg.seed
    if not os.path.isfile(spec):
        raise UsageError(f"{spec}: no such file; pass a checkpoint.pth or backbone.pth written by train_ddp.py, "
                         "or 'pixels' or 'random'")
    backbone, cfg = checkpoints.backbone_from_checkpoint(spec)
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


def knn_against_random_init(cfg, splits, backbone, max_train=10_000):
    """What a run on a built-in set writes to eval.json: the k-NN (k = 20) of its trained teacher
    and of the initialisation it started from on the test split (training features from the
    first `max_train` images of the training split)."""
    train, test = first(splits, max_train, 0)
    scores = {}
    for name, model in (("knn_top1", backbone), ("knn_top1_random_init", random_backbone(cfg))):
        train_features, test_features = (backbone_features(model, images, keep_patches=False)["image"]
                                         for images in (train[0], test[0]))
        scores[name] = knn_scores(train_features, train[1], test_features, test[1], ks=(KNN_K,))[f"knn_top1_k{KNN_K}"]
    return {**scores, "k": KNN_K, "temperature": KNN_TEMPERATURE, "train_images": len(train[0]),
            "test_images": len(test[0])}


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser():
    parser = data.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{knn,linear,dense,all}")
    for name in (*PROTOCOLS, "all"):
        command = commands.add_parser(name, help=f"{name} protocol(s) on one backbone")
        command.add_argument("backbone", help="checkpoint.pth or backbone.pth from train_ddp.py, 'pixels' or 'random'")
        command.add_argument("--data", choices=sorted(data.BUILTIN_DATASETS), default="embedded")
        add_split_sizes(command)
        command.add_argument("--seed", type=int, default=None,
                             help="seed of the embedded dataset, the probes and 'random' (default: the checkpoint's "
                                  "pretraining seed, else 0)")
        command.add_argument("--out", help="JSON file (default: <protocol>-<data>.json next to the checkpoint, "
                                           "or <backbone>-<protocol>-<data>.json here)")
    return parser


def add_split_sizes(parser):
    """--train-images / --test-images, shared with compare.py."""
    parser.add_argument("--train-images", type=int, default=10_000,
                        help="fit k-NN and probes on the first N training images (0: all; Fashion-MNIST has 60000)")
    parser.add_argument("--test-images", type=int, default=0, help="score on the first N test images (0: all)")


def check_split_sizes(args):
    if args.train_images < 0 or args.test_images < 0:
        raise UsageError("--train-images / --test-images: must be >= 0 (0: all)")
    if 0 < args.train_images < max(KNN_KS):
        raise UsageError(f"--train-images {args.train_images}: the k-NN needs at least {max(KNN_KS)} training images")


def default_out(args):
    if args.backbone in SPECIAL_BACKBONES:
        return f"{args.backbone}-{args.command}-{args.data}.json"
    return os.path.join(os.path.dirname(args.backbone), f"{args.command}-{args.data}.json")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        check_split_sizes(args)
        start = time.perf_counter()
        backbone, img_size, patch_size, seed = load_backbone(args.backbone, args.data, args.seed)
        if backbone is not None:
            backbone.to("cuda" if torch.cuda.is_available() else "cpu")
        splits = first(data.BUILTIN_DATASETS[args.data](seed, img_size), args.train_images, args.test_images)
        protocols = all_protocols(splits) if args.command == "all" else (args.command,)
        result = {"backbone": args.backbone, "data": args.data, "seed": seed, "train_images": len(splits[0][0]),
                  "test_images": len(splits[1][0]), "knn_temperature": KNN_TEMPERATURE,
                  **evaluate(backbone, patch_size, splits, protocols, seed)}
        result["seconds"] = time.perf_counter() - start
        out = args.out or default_out(args)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        checkpoints.save_atomic_json(result, out)
        print(", ".join(f"{k} {v:.2f}" for k, v in result.items() if k in METRICS) + f" -> {out}")
        return 0
    except UsageError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
