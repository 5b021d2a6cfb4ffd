"""Evaluate frozen backbones from train_ddp.py: k-NN, linear and dense probes.

    python evaluate.py knn runs/embedded/checkpoint.pth          # -> runs/embedded/knn-embedded.json
    python evaluate.py linear runs/fm/backbone.pth --data fashion-mnist
    python evaluate.py dense runs/embedded/checkpoint.pth        # embedded only: it has label maps
    python evaluate.py all runs/embedded/checkpoint.pth --out eval.json   # every protocol, one forward pass
    python evaluate.py all pixels --data fashion-mnist           # raw-pixel baseline
    python evaluate.py all random --seed 1                       # random init of the preset architecture
    python evaluate.py knn runs/vits16/checkpoint.pth --data /imagenet   # DINO's k-NN on ROOT/train, ROOT/val
    torchrun --nproc_per_node=8 evaluate.py linear runs/vits16/checkpoint.pth --data /imagenet   # DINO's linear

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

On --data ROOT (train/ and val/ ImageFolder trees) knn and linear follow DINO's eval_knn.py and
eval_linear.py instead (knn_on_datasets, linear_on_datasets), one shard of the images per rank
under torchrun; the vote (knn_correct), the probe's loop (train_probe) and the frozen features
(frozen_tokens) are the same code as above.
"""
import argparse
import functools
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset, TensorDataset

import checkpoints
import data
import pqcl
from data import UsageError

KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO's k-NN protocol; training's eval.json reports k = 20
KNN_KS = (10, KNN_K)
DINO_KNN_KS = (10, 20, 100, 200)  # DINO's eval_knn.py, reported by `knn --data ROOT`
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


def backbone_device(backbone):
    return next(backbone.parameters()).device


@torch.no_grad()
def frozen_tokens(backbone, images, n_last_blocks=1, amp=False):
    """uint8 images (c, 3, S, S) on any device -> ImageNet-normalised on the backbone's device ->
    the frozen tokens after each of its last n blocks: a list of n float32 tensors (c, 1 + N, D)
    on that device, deepest last. amp: under bf16 autocast when the device is a GPU."""
    device = backbone_device(backbone)
    mean = torch.tensor(pqcl.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pqcl.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    pixels = (images.to(device, non_blocking=True).float() / 255 - mean) / std
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        layers = backbone.get_intermediate_layers(pixels, n_last_blocks)
    return [tokens.float() for tokens in layers]


def probe_features(layers, avgpool_patchtokens):
    """DINO's linear-probe features: the [CLS] of each of the n layers (c, 1 + N, D) concatenated,
    then the mean patch token of the deepest if avgpool_patchtokens -> (c, n D) or (c, (n + 1) D)."""
    parts = [tokens[:, 0] for tokens in layers] + ([layers[-1][:, 1:].mean(1)] if avgpool_patchtokens else [])
    return torch.cat(parts, dim=-1)


def backbone_features(backbone, images, keep_patches, batch_size=256):
    """uint8 images (n, 3, S, S) -> CPU {"image": [CLS] (n, D), "cls_avgpool": [CLS] and the mean
    patch token (n, 2D), "patches": (n, N, D) row-major if keep_patches}, batch_size at a time."""
    image, cls_avgpool, patches = [], [], []
    for chunk in images.split(batch_size):
        tokens = frozen_tokens(backbone, chunk)[0].cpu()  # (c, 1 + N, D)
        image.append(tokens[:, 0])
        cls_avgpool.append(probe_features([tokens], avgpool_patchtokens=True))
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


def knn_chunk_rows(num_train, budget=2**27):
    """Test rows per chunk of the vote: (rows, num_train) float32 similarities stay within
    `budget` elements (512 MiB), e.g. 104 rows against ImageNet's 1.28 M training images."""
    return max(1, min(1024, budget // num_train))


def knn_correct(train_features, train_labels, test_features, test_labels, ks=KNN_KS, temperature=KNN_TEMPERATURE,
                num_classes=None, chunk=None):
    """The weighted vote of DINO on l2-normalised features (n, D), (m, D) on one device: the k
    nearest training features (cosine) vote for their labels with weight exp(sim / T).
    -> (len(ks), 2) counts of test images whose label is the vote's top-1 / among its top-5,
    for each k. The nearest max(ks) are found once; chunked over the test set (knn_chunk_rows)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    chunk = chunk or knn_chunk_rows(len(train_features))
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=test_features.device)
    for features, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        sims, neighbours = (features @ train_features.T).topk(max(ks), dim=1)  # (c, max k), nearest first
        weights, neighbour_labels = (sims / temperature).exp(), train_labels[neighbours]  # (c, max k) each
        for row, k in enumerate(ks):
            votes = torch.zeros(len(features), num_classes, device=features.device).scatter_add_(
                1, neighbour_labels[:, :k], weights[:, :k])  # (c, C)
            top5 = votes.topk(min(5, num_classes), dim=1).indices  # (c, 5)
            correct[row, 0] += (votes.argmax(1) == labels).sum()
            correct[row, 1] += (top5 == labels[:, None]).any(1).sum()
    return correct


def knn_percent(correct, num_test, ks, top5=False):
    """knn_correct's counts (summed over ranks) -> {"knn_top1_k20": percent, ...}."""
    scores = {}
    for (top1_count, top5_count), k in zip(correct.tolist(), ks):
        scores[f"knn_top1_k{k}"] = 100.0 * top1_count / num_test
        if top5:
            scores[f"knn_top5_k{k}"] = 100.0 * top5_count / num_test
    return scores


def knn_scores(train_features, train_labels, test_features, test_labels, ks=KNN_KS, temperature=KNN_TEMPERATURE,
               chunk=None):
    """Weighted k-NN top-1 (percent) for each k, features (n, D), (m, D) l2-normalised here."""
    train_features, test_features = F.normalize(train_features, dim=-1), F.normalize(test_features, dim=-1)
    correct = knn_correct(train_features, train_labels, test_features, test_labels, ks, temperature, chunk=chunk)
    return knn_percent(correct, len(test_labels), ks)


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


def train_probe(probe, optimizer, epochs, epoch_batches, lr_at, after_epoch=None):
    """The probes' training loop, shared by the in-memory probes and DINO's linear evaluation:
    for each epoch in `epochs`, each (features (b, F), labels (b,)) of epoch_batches(epoch) is
    one step of the cross-entropy at lr_at(epoch, i); then after_epoch(epoch) if given."""
    for epoch in epochs:
        probe.train()
        for i, (features, labels) in enumerate(epoch_batches(epoch)):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, i)
            loss = F.cross_entropy(probe(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if after_epoch is not None:
            after_epoch(epoch)


def fit_linear_probe(features, labels, num_classes, epochs, batch_size, lr, weight_decay, seed):
    """Frozen features (n, D), labels (n,) in [0, num_classes) -> a LinearProbe fitted by AdamW
    on the cross-entropy, lr cosine from `lr` to 0 per step; data order seeded by `seed`."""
    probe = LinearProbe(features.mean(0), features.std(0) + 1e-6, num_classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    order_rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(features) / batch_size)

    def epoch_batches(epoch):
        for batch in torch.randperm(len(features), generator=order_rng).split(batch_size):
            yield features[batch], labels[batch]

    train_probe(probe, optimizer, range(epochs), epoch_batches,
                lambda epoch, i: pqcl.cosine_schedule(epoch * steps_per_epoch + i, epochs * steps_per_epoch, lr, 0.0))
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
# Datasets, a shard per rank: DINO's k-NN and linear evaluation, in one process or torchrun
# --------------------------------------------------------------------------------------


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def start_distributed():
    """torchrun (WORLD_SIZE > 1): join its process group, NCCL on GPUs, gloo on CPUs.
    -> this process's device."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@functools.lru_cache(maxsize=2)  # train_ddp.py's k-NN monitor reads its set once
def evaluation_sets(data_name, img_size, seed=0, flag="--data"):
    """A built-in set (its train and test splits, in memory) or ROOT with train/ and val/ ImageFolder
    trees (DINO's preprocessing, data.eval_transform) -> (train, val, number of classes), each
    dataset index -> (uint8 image (3, S, S), label)."""
    if data_name in data.BUILTIN_DATASETS:
        (train_images, train_labels, _), (test_images, test_labels, _) = data.BUILTIN_DATASETS[data_name](seed, img_size)
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        return TensorDataset(train_images, train_labels), TensorDataset(test_images, test_labels), num_classes
    train, val = data.image_folder_splits(data_name, flag, data.eval_transform(img_size))
    return train, val, len(train.classes)


class Throughput:
    """Rank 0's progress line over a pass of `total` images: images/s and ETA, every `every` s and at the end."""

    def __init__(self, what, total, every=10.0):
        self.what, self.total, self.every = what, total, every
        self.start = self.printed = time.perf_counter()
        self.show = rank_and_world()[0] == 0

    def update(self, done):
        now, done = time.perf_counter(), min(done, self.total)
        if self.show and (now - self.printed >= self.every or done == self.total):
            self.printed = now
            rate = done / max(now - self.start, 1e-9)
            print(f"{self.what}: {done}/{self.total} images | {rate:.1f} img/s | ETA {(self.total - done) / rate:.0f}s",
                  flush=True)


def extract_shard(dataset, batch_size, workers, features_of, what):
    """This rank's shard of `dataset` (index -> (uint8 image (3, S, S), label)): indices rank,
    rank + W, ... (disjoint; together every image once) -> (features_of(images) (n_r, F), labels
    (n_r,)) on the features' device, with a progress line."""
    rank, world_size = rank_and_world()
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), batch_size=batch_size,
                        num_workers=workers, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=data.leave_sigterm_to_the_main_process)  # also the k-NN monitor inside training
    progress, done, features, labels = Throughput(what, len(dataset)), 0, [], []
    for images, targets in loader:
        features.append(features_of(images))
        labels.append(targets.to(features[-1].device))
        done += len(images)
        progress.update(done * world_size)
    return torch.cat(features), torch.cat(labels)


def gather_shards(local, total):
    """Every rank's shard (items rank::W of `total`, (n_r, ...)) -> all items in dataset order
    (total, ...) on every rank (all_gather of shards padded to equal length)."""
    world_size = rank_and_world()[1]
    if world_size == 1:
        return local
    rows = math.ceil(total / world_size)
    padded = torch.cat([local, local.new_zeros(rows - len(local), *local.shape[1:])])  # (rows, ...)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten(0, 1)[:total]  # (rows, W, ...): item j W + r at row j W + r


def all_ranks_sum(counts):
    if dist.is_initialized():
        dist.all_reduce(counts)
    return counts


def knn_on_datasets(backbone, train_set, val_set, num_classes, batch_size=128, workers=0, ks=DINO_KNN_KS,
                    temperature=KNN_TEMPERATURE):
    """DINO's k-NN on datasets of preprocessed images (evaluation_sets): each rank extracts the
    l2-normalised [CLS] of its shard of both; the training features are gathered on every rank
    (n x D float32 on its device); each rank votes (knn_correct) for its validation shard and the
    counts are summed -> {"knn_top1_k10": percent, "knn_top5_k10": percent, ...}."""
    def cls_features(images):
        return F.normalize(frozen_tokens(backbone, images)[0][:, 0], dim=-1)  # (c, D)

    train_features, train_labels = extract_shard(train_set, batch_size, workers, cls_features, "k-NN train features")
    train_features, train_labels = (gather_shards(part, len(train_set)) for part in (train_features, train_labels))
    val_features, val_labels = extract_shard(val_set, batch_size, workers, cls_features, "k-NN val features")
    correct = knn_correct(train_features, train_labels, val_features, val_labels, ks, temperature, num_classes)
    return knn_percent(all_ranks_sum(correct), len(val_set), ks, top5=True)


def knn_monitor(backbone, knn_data, img_size, seed, workers=0, batch_size=128):
    """train_ddp.py --knn-data: the k-NN top-1 (k = 20) of `backbone` on a built-in set's test
    split or on ROOT/val, every rank extracting its shard."""
    train, val, num_classes = evaluation_sets(knn_data, img_size, seed, "--knn-data")
    return knn_on_datasets(backbone, train, val, num_classes, batch_size, workers, ks=(KNN_K,))[f"knn_top1_k{KNN_K}"]


def linear_on_datasets(backbone, train_folder, val_set, num_classes, img_size, seed, args, checkpoint_path):
    """DINO's linear evaluation, DDP over the ranks. A linear layer (weights N(0, 0.01), zero bias)
    on the frozen features of probe_features (args.n_last_blocks, args.avgpool_patchtokens); SGD
    momentum 0.9, no weight decay, lr args.lr x global batch / 256, cosine to 0 over args.epochs
    (per epoch, as DINO). train_folder: a torchvision ImageFolder whose files are augmented per sample
    (data.linear_train_transform) seeded by (seed, epoch, index), so rank count and resume do not
    change the data. Val top-1 / top-5 every args.val_every epochs and after the last; probe,
    optimizer and history written atomically to checkpoint_path after each epoch (rank 0), where
    args.resume continues. -> {"linear_top1", "linear_top5" (last), "best_top1", "best_epoch", "history"}."""
    rank, world_size = rank_and_world()
    device = backbone_device(backbone)
    torch.manual_seed(seed)
    probe = nn.Linear(backbone.embed_dim * (args.n_last_blocks + args.avgpool_patchtokens), num_classes).to(device)
    nn.init.normal_(probe.weight, std=0.01)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)
    history, start_epoch = [], 0
    if args.resume:
        state = checkpoints.load_checkpoint(checkpoint_path)
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = state["history"], state["epoch"]
    trained = DistributedDataParallel(probe, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else probe
    samples = data.Augmented(data.ClassifiedImages(train_folder),
                             functools.partial(data.labelled_sample, data.linear_train_transform(img_size)), seed)
    sampler = data.ResumableSampler(len(samples), args.batch_size, seed, rank, world_size)
    loader = DataLoader(samples, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    peak_lr = args.lr * args.batch_size * world_size / 256

    def features_of(images):  # uint8 (c, 3, S, S) -> (c, F), no grad
        return probe_features(frozen_tokens(backbone, images, args.n_last_blocks, amp=True), args.avgpool_patchtokens)

    def epoch_batches(epoch):
        sampler.set_position(epoch)
        progress = Throughput(f"linear epoch {epoch + 1}/{args.epochs}", sampler.steps_per_epoch * args.batch_size
                              * world_size)
        for step, batch in enumerate(loader):
            yield features_of(batch["images"]), batch["labels"].to(device)
            progress.update((step + 1) * args.batch_size * world_size)

    def validate():
        probe.eval()
        with torch.no_grad():
            logits, labels = extract_shard(val_set, args.batch_size, args.workers, lambda images: probe(features_of(images)),
                                           "linear val")
        hits = logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]  # (n_r, 5)
        top1, top5 = all_ranks_sum(torch.stack([hits[:, 0].sum(), hits.any(1).sum()])).tolist()
        return {"top1": 100.0 * top1 / len(val_set), "top5": 100.0 * top5 / len(val_set)}

    def after_epoch(epoch):
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            history.append({"epoch": epoch + 1, **validate()})
            if rank == 0:
                print(f"linear epoch {epoch + 1}: val top-1 {history[-1]['top1']:.2f} top-5 {history[-1]['top5']:.2f}",
                      flush=True)
        if rank == 0:
            checkpoints.save_atomic({"probe": probe.state_dict(), "optimizer": optimizer.state_dict(),
                                     "epoch": epoch + 1, "history": history}, checkpoint_path)

    train_probe(trained, optimizer, range(start_epoch, args.epochs), epoch_batches,
                lambda epoch, step: pqcl.cosine_schedule(epoch, args.epochs, peak_lr, 0.0), after_epoch)
    best = max(history, key=lambda record: record["top1"])
    return {"linear_top1": history[-1]["top1"], "linear_top5": history[-1]["top5"], "best_top1": best["top1"],
            "best_top5": best["top5"], "best_epoch": best["epoch"], "lr": peak_lr, "history": history}


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser():
    parser = data.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{knn,linear,dense,all}")
    for name in (*PROTOCOLS, "all"):
        command = commands.add_parser(name, help=f"{name} protocol(s) on one backbone")
        command.add_argument("backbone", help="checkpoint.pth or backbone.pth from train_ddp.py, 'pixels' or 'random'")
        command.add_argument("--data", default="embedded",
                             help="a built-in set (" + ", ".join(sorted(data.BUILTIN_DATASETS)) + "; default embedded)"
                                  + (" or ROOT holding train/ and val/ ImageFolder trees (DINO's protocol, one process "
                                     "or torchrun)" if name in ("knn", "linear") else ""))
        add_split_sizes(command)
        command.add_argument("--seed", type=int, default=None,
                             help="seed of the embedded dataset, the probes and 'random' (default: the checkpoint's "
                                  "pretraining seed, else 0)")
        command.add_argument("--out", help="JSON file (default: <protocol>-<data>.json next to the checkpoint, "
                                           "or <backbone>-<protocol>-<data>.json here)")
        if name in ("knn", "linear"):
            add_folder_flags(command, name)
    return parser


def add_folder_flags(command, name):
    folder = command.add_argument_group("--data ROOT (ImageFolder trees)")
    folder.add_argument("--img-size", type=int, help="evaluation resolution (default: the checkpoint's); a multiple "
                                                     "of its patch size")
    folder.add_argument("--batch-size", type=int, default=128, help="images per process and step (DINO: 128)")
    folder.add_argument("--workers", type=int, default=8, help="data-loading processes per process")
    if name == "knn":
        folder.add_argument("--ks", type=int, nargs="+", default=list(DINO_KNN_KS), help="the k of the vote")
        return
    folder.add_argument("--epochs", type=int, default=100, help="DINO: 100")
    folder.add_argument("--lr", type=float, default=1e-3, help="at global batch 256, scaled linearly (DINO: 1e-3)")
    folder.add_argument("--n-last-blocks", type=int, default=4,
                        help="concatenate the [CLS] of the last N blocks (DINO: 4 for ViT-S, 1 for ViT-B)")
    folder.add_argument("--avgpool-patchtokens", action="store_true",
                        help="append the mean patch token of the last block (DINO: on for ViT-B)")
    folder.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    folder.add_argument("--resume", action="store_true",
                        help="continue the probe's checkpoint (the --out path with .pth for .json)")


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
    data_name = os.path.basename(os.path.normpath(args.data))
    if args.backbone in SPECIAL_BACKBONES:
        return f"{args.backbone}-{args.command}-{data_name}.json"
    return os.path.join(os.path.dirname(args.backbone), f"{args.command}-{data_name}.json")


def evaluate_builtin(args):
    """The built-in set's protocols, in memory, one process -> the JSON's contents."""
    check_split_sizes(args)
    backbone, img_size, patch_size, seed = load_backbone(args.backbone, args.data, args.seed)
    if backbone is not None:
        backbone.to("cuda" if torch.cuda.is_available() else "cpu")
    splits = first(data.BUILTIN_DATASETS[args.data](seed, img_size), args.train_images, args.test_images)
    protocols = all_protocols(splits) if args.command == "all" else (args.command,)
    return {"backbone": args.backbone, "data": args.data, "seed": seed, "train_images": len(splits[0][0]),
            "test_images": len(splits[1][0]), "knn_temperature": KNN_TEMPERATURE,
            **evaluate(backbone, patch_size, splits, protocols, seed)}


def evaluate_folder(args, out):
    """DINO's k-NN or linear evaluation on ROOT/train and ROOT/val, sharded over torchrun's ranks;
    every input is checked before anything is computed or written -> the JSON's contents."""
    if not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data}: neither a built-in set ({', '.join(sorted(data.BUILTIN_DATASETS))}) "
                         "nor a folder; give a folder holding train/ and val/ ImageFolder trees")
    if args.command not in ("knn", "linear"):
        raise UsageError(f"{args.command} on --data ROOT: only knn and linear evaluate ImageFolder trees")
    if args.backbone == "pixels":
        raise UsageError("pixels on --data ROOT: the raw-pixel baseline runs on built-in sets only; pass a checkpoint")
    for flag in ("batch_size", "epochs", "val_every", "n_last_blocks"):
        if getattr(args, flag, 1) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    backbone, checkpoint_size, patch_size, seed = load_backbone(args.backbone, args.data, args.seed)
    img_size = args.img_size or checkpoint_size
    if img_size < patch_size or img_size % patch_size:
        raise UsageError(f"--img-size {img_size}: the checkpoint's patch size is {patch_size}; pick a multiple of it "
                         f"(e.g. {max(1, round(img_size / patch_size)) * patch_size})")
    train, val, num_classes = evaluation_sets(args.data, img_size)
    if args.command == "knn" and max(args.ks) > len(train):
        raise UsageError(f"--ks {max(args.ks)}: more neighbours than the {len(train)} training images; lower --ks")
    if args.command == "linear" and args.n_last_blocks > len(backbone.blocks):
        raise UsageError(f"--n-last-blocks {args.n_last_blocks}: the backbone has {len(backbone.blocks)} blocks")
    if args.command == "linear" and args.resume:
        checkpoints.load_checkpoint(probe_checkpoint_path(out))  # a missing or unreadable one fails here
    backbone.to(start_distributed())
    result = {"backbone": args.backbone, "data": args.data, "img_size": img_size, "train_images": len(train),
              "val_images": len(val), "classes": num_classes, "world_size": rank_and_world()[1]}
    if args.command == "knn":
        return {**result, "knn_temperature": KNN_TEMPERATURE,
                **knn_on_datasets(backbone, train, val, num_classes, args.batch_size, args.workers, tuple(args.ks))}
    return {**result, "seed": seed, "n_last_blocks": args.n_last_blocks,
            "avgpool_patchtokens": args.avgpool_patchtokens, "global_batch": args.batch_size * result["world_size"],
            **linear_on_datasets(backbone, train, val, num_classes, img_size, seed, args,
                                 probe_checkpoint_path(out))}


def probe_checkpoint_path(out):
    return os.path.splitext(out)[0] + ".pth"


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        start = time.perf_counter()
        out = args.out or default_out(args)
        builtin = args.data in data.BUILTIN_DATASETS
        result = evaluate_builtin(args) if builtin else evaluate_folder(args, out)
        result["seconds"] = time.perf_counter() - start
        if rank_and_world()[0] == 0:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            checkpoints.save_atomic_json(result, out)
            shown = METRICS if builtin else [k for k in result if k.startswith(("knn_top", "linear_top", "best_top"))]
            print(", ".join(f"{k} {v:.2f}" for k, v in result.items() if k in shown) + f" -> {out}")
        return 0
    except UsageError as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
