"""Pretrain PQCL (pqcl.py) on one CPU or on many GPUs.

    python train_ddp.py                         # embedded shapes dataset, CPU, a few minutes, prints k-NN
    python train_ddp.py --data /imagenet/train  # one process on an ImageFolder tree, the authors' ViT-S recipe
    torchrun --nproc_per_node=8 train_ddp.py --data /imagenet/train --arch vit_small --output-dir runs/vits16
    torchrun --nnodes=2 --nproc_per_node=8 --node-rank=$RANK --rdzv-backend=c10d \\
             --rdzv-endpoint=$HEAD_NODE:29500 train_ddp.py --data /imagenet/train --output-dir runs/vits16
    python train_ddp.py --export runs/vits16/checkpoint.pth backbone.pth   # teacher backbone, timm names

The method lives in pqcl.py; this file is the machinery: data, DDP, mixed precision,
schedules, atomic checkpoints and exact resume, logs, export, and the k-NN check.
Every Config field of pqcl.py is a flag (--query-weight, --num-queries, ...).
"""
import argparse
import ctypes
import dataclasses
import gzip
import inspect
import json
import math
import os
import re
import resource
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

import pqcl

# The embedded default: small enough to pretrain on 2 CPU cores in a few minutes.
EMBEDDED = dict(  # the recipe's choices, except where a run of minutes needs otherwise;
    # the comments give the default run's k-NN top-1 (%, seed 0; random init 20.2) for the alternatives tried
    arch="vit_tiny", depth=4, img_size=32, patch_size=4, query_size=12,  # 8 x 8 patches, 3 x 3 query patches
    global_scale=(0.4, 1.0), drop_path_rate=0.0, out_dim=1024, hidden_dim=512, bottleneck_dim=128,
    epochs=2, batch_size=64, warmup_epochs=1,
    lr=4e-3,  # x 64 / 256 = 1e-3 applied; 29.9 here, 27.3 at 8e-3, 24.8 at 1e-3
    teacher_temp=0.07, warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=0,  # 29.9; 25.9 at 0.1, 21.0 at 0.04
    momentum_teacher=0.95,  # 29.9; 23.6 at 0.9; at 0.99 the teacher lags ~100 of the run's 186 steps
    freeze_last_layer_epochs=0)
EMBEDDED_TRAIN, EMBEDDED_TEST = 6000, 1000  # images in the embedded splits


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# --------------------------------------------------------------------------------------
# The embedded dataset: shapes on textured backgrounds, with per-pixel labels
# --------------------------------------------------------------------------------------

def _ring(r, inner, outer):
    return (r > inner) & (r < outer)


SHAPES = {  # name -> is (u, v), in the object's own unit frame, inside the shape?
    "disk": lambda u, v: np.hypot(u, v) < 0.9,
    "ring": lambda u, v: _ring(np.hypot(u, v), 0.55, 0.95),
    "square": lambda u, v: np.maximum(abs(u), abs(v)) < 0.75,
    "frame": lambda u, v: _ring(np.maximum(abs(u), abs(v)), 0.5, 0.85),
    "triangle": lambda u, v: (v > -0.5) & (v < 1.0 - math.sqrt(3) * abs(u)),
    "plus": lambda u, v: ((abs(u) < 0.3) & (abs(v) < 0.95)) | ((abs(v) < 0.3) & (abs(u) < 0.95)),
    "star": lambda u, v: np.hypot(u, v) < 0.45 + 0.5 * abs(np.cos(2.5 * np.arctan2(v, u))) ** 3,
    "half-disk": lambda u, v: (np.hypot(u, v) < 0.95) & (v > 0),
    "bar": lambda u, v: (abs(u) < 0.95) & (abs(v) < 0.3),
    "corner": lambda u, v: ((abs(u + 0.55) < 0.3) & (abs(v) < 0.85)) | ((abs(v - 0.55) < 0.3) & (abs(u) < 0.85)),
}


def make_shapes(num, size=32, seed=0, supersample=2, chunk=250):
    """`num` images of one shape each (class = shape, 10 classes) at a random position, size
    and rotation, striped, on a dark striped background; colours of random hue at 35%
    saturation, and half the images in negative (object darker than background). Deterministic
    in `seed`. Self-distillation learns what two views of an image share: here the shape,
    since hue is faint, polarity flips and the crops move the object; raw pixels do not align
    across images. (With saturated random colours the views share colour first, and the shape
    is not learnt in a short run.)
    Returns images (num, 3, size, size) uint8, labels (num,), label maps (num, size, size)
    uint8 with 0 = background and 1 + class on the shape."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(SHAPES), size=num)

    def uniform(lo, hi, *shape):  # one value per image, broadcastable over (n, [3,] H, W)
        return rng.uniform(lo, hi, (num, *shape, 1, 1)).astype(np.float32)

    def desaturate(rgb):  # keep 35% of the colour around each grey level
        grey = rgb.mean(axis=-3, keepdims=True)
        return grey + 0.35 * (rgb - grey)

    def hue(*shape):  # random colours, brightest channel 1: (num, *shape, 3, 1, 1)
        rgb = uniform(0.05, 1, *shape, 3)
        return rgb / rgb.max(axis=-3, keepdims=True)

    stripes = (uniform(0, np.pi), uniform(0.1, 0.6), uniform(0, 2 * np.pi))  # background: angle, frequency, phase
    background_colours = desaturate(hue(2) * uniform(0.1, 0.45, 2, 1))  # (num, 2, 3, 1, 1): dark, every channel <= 0.45
    scale, rotation = uniform(0.26, 0.4) * size, uniform(0, 2 * np.pi)
    centre_x, centre_y = uniform(0.35, 0.65, 2).transpose(1, 0, 2, 3) * size
    texture = (uniform(0, np.pi), uniform(0.5, 1.5), uniform(0, 2 * np.pi))
    shape_colour = desaturate(0.55 + 0.45 * hue())  # (num, 3, 1, 1): bright, every channel >= 0.55
    negative = rng.uniform(size=num) < 0.5
    noise = rng.normal(0, 0.04, (num, 3, size, size)).astype(np.float32)
    coords = ((np.arange(size * supersample) + 0.5) / supersample).astype(np.float32)  # pixel units, supersampled
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # (h, w)
    images = np.empty((num, 3, size, size), np.uint8)
    label_maps = np.empty((num, size, size), np.uint8)

    def grating(angle, freq, phase):  # (n, 1, 1) parameters -> (n, h, w) in [0, 1]
        return 0.5 + 0.5 * np.sin(freq * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)

    def downsample(x):  # (..., h, w) supersampled -> (..., size, size) averages
        return x.reshape(*x.shape[:-2], size, supersample, size, supersample).mean((-3, -1))

    for lo in range(0, num, chunk):
        part = slice(lo, min(lo + chunk, num))
        mix = grating(*(p[part] for p in stripes))[:, None]  # (n, 1, h, w)
        background = background_colours[part, 0] * mix + background_colours[part, 1] * (1 - mix)  # (n, 3, h, w)
        dx, dy = (xs - centre_x[part]) / scale[part], (ys - centre_y[part]) / scale[part]  # (n, h, w)
        rot = rotation[part]
        u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
        inside = np.zeros(u.shape, bool)
        for kind, is_inside in enumerate(SHAPES.values()):
            chosen = labels[part] == kind
            inside[chosen] = is_inside(u[chosen], v[chosen])
        foreground = shape_colour[part] * (0.7 + 0.3 * grating(*(p[part] for p in texture))[:, None])
        image = downsample(np.where(inside[:, None], foreground, background))
        image = np.where(negative[part, None, None, None], 1 - image, image) + noise[part]
        images[part] = np.clip(image * 255, 0, 255).astype(np.uint8)
        label_maps[part] = np.where(downsample(inside.astype(np.float32)) >= 0.5, labels[part, None, None] + 1, 0)
    return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(label_maps)


def embedded_test_split(seed=0, size=32):
    """The held-out split of the embedded dataset: (images, labels, label_maps)."""
    return make_shapes(EMBEDDED_TEST, size, seed + 10_000)


def embedded_splits(seed=0, size=32):
    """(train, test) splits of the embedded dataset, each (images, labels, label_maps)."""
    return make_shapes(EMBEDDED_TRAIN, size, seed), embedded_test_split(seed, size)


FASHION_MNIST = os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


def read_idx(path):
    """An IDX file (the MNIST format, gzipped) -> numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist_splits(seed=0, size=32, root=FASHION_MNIST):
    """(train, test) of Fashion-MNIST, each (images (n, 3, size, size) uint8, labels, None).
    The 28 x 28 images are padded with their own black background to 32 x 32, an 8 x 8 grid
    of 4-px patches with no resampling (resized only if size is not 32)."""
    files = {split: (os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"))
             for split, prefix in (("train", "train"), ("test", "t10k"))}
    if not all(os.path.exists(p) for pair in files.values() for p in pair):
        raise UsageError(f"Fashion-MNIST is not in {root}; install it with "
                         "'apt-get install -y dataset-fashion-mnist' (or set FASHION_MNIST to its folder)")
    splits = []
    for images_path, labels_path in files.values():
        images = F.pad(torch.from_numpy(read_idx(images_path).copy()), (2, 2, 2, 2))  # (n, 32, 32)
        images = images[:, None].expand(-1, 3, -1, -1)  # (n, 3, 32, 32), grey as RGB
        if size != 32:
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
            images = images.round().clamp(0, 255).to(torch.uint8)
        splits.append((images.contiguous(), torch.from_numpy(read_idx(labels_path).astype(np.int64)), None))
    return tuple(splits)


BUILTIN_DATASETS = {"embedded": embedded_splits, "fashion-mnist": fashion_mnist_splits}


# --------------------------------------------------------------------------------------
# Data: reproducible per-sample augmentation, resumable sampling, unreadable images skipped
# --------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """An ImageFolder tree (one subfolder per class) read with PIL; unreadable files are
    replaced by the next readable one and counted in the sample's `skipped`."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root):
        if not os.path.isdir(root):
            raise UsageError(f"--data {root}: no such folder; point it at an ImageFolder tree "
                             "(one subfolder per class) or omit --data for the embedded dataset")
        self.paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                            for name in names if name.lower().endswith(self.EXTENSIONS))
        if not self.paths:
            raise UsageError(f"--data {root}: holds no images ({', '.join(self.EXTENSIONS)}); "
                             "point it at an ImageFolder tree or omit --data for the embedded dataset")

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        """-> (PIL image, number of unreadable files passed over to find it)"""
        for skipped in range(len(self.paths)):
            path = self.paths[(index + skipped) % len(self.paths)]
            try:
                with Image.open(path) as image:
                    return image.convert("RGB"), skipped
            except Exception as error:  # corrupt, truncated or unreadable: skip it, report it
                print(f"warning: skipping unreadable image {path}: {error}", file=sys.stderr)
        raise RuntimeError("no readable image in the dataset")


class InMemoryImages(Dataset):
    def __init__(self, images):
        self.images = images  # (n, 3, S, S) uint8

    def __len__(self):
        return len(self.images)

    def load(self, index):
        return self.images[index], 0


class Augmented(Dataset):
    """(epoch, index) -> the augmented sample, seeded by (seed, epoch, index) alone, so the
    data do not depend on worker count, rank or where a run was resumed."""

    def __init__(self, source, augment, seed):
        self.source, self.augment, self.seed = source, augment, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        image, skipped = self.source.load(index)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            sample = self.augment(image)
        sample["skipped"] = skipped
        return sample


class ResumableSampler(Sampler):
    """Yields (epoch, index) for this rank: a permutation seeded by (seed, epoch), cut to a
    whole number of global batches and dealt round-robin over ranks; starts at `start_step`."""

    def __init__(self, size, batch_size, seed, rank=0, world_size=1):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.steps_per_epoch = size // (batch_size * world_size)
        self.epoch, self.start_step = 0, 0

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        order = order[: self.steps_per_epoch * self.batch_size * self.world_size][self.rank :: self.world_size]
        for index in order[self.start_step * self.batch_size :].tolist():
            yield self.epoch, index


# --------------------------------------------------------------------------------------
# Command line: every pqcl.Config field is a flag, its source comment the help
# --------------------------------------------------------------------------------------


def _config_help():
    source = inspect.getsource(pqcl.Config)
    return dict(re.findall(r"^    (\w+): [^=]+= .*?#\s*(.*)$", source, re.M))


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--data", default="embedded",
                     help="an ImageFolder tree, or a built-in set: 'embedded' (generated shapes, the default) "
                          "or 'fashion-mnist' (apt-get install -y dataset-fashion-mnist)")
    run.add_argument("--subset", type=int, default=0, help="pretrain on the first N images only (0: all)")
    run.add_argument("--output-dir", default="runs/embedded", help="checkpoint.pth, log.jsonl, backbone.pth, eval.json")
    run.add_argument("--resume", action="store_true", help="continue <output-dir>/checkpoint.pth at its exact step")
    run.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: run all epochs)")
    run.add_argument("--ckpt-every", type=int, default=500, help="also write the checkpoint every this many steps")
    run.add_argument("--log-every", type=int, default=20, help="steps between log lines (and loss/stop checks)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision; auto = bf16 on GPU, fp32 on CPU (faster on CPUs without AMX)")
    run.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks and heads")
    run.add_argument("--workers", type=int, default=-1,
                     help="data-loading processes per GPU/process (-1: for an ImageFolder the node's cores shared "
                          "among its processes, one left to each for training; 0 for built-in sets). Augmentation "
                          "bounds GPU training: bench.py measures the images/s of one worker")
    run.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                     help="after training on a built-in set, k-NN of the teacher vs a random init on its test split")
    run.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"),
                     help="write the teacher backbone of CKPT to OUT (timm names) and exit")
    method = parser.add_argument_group("method (pqcl.Config; defaults: the authors' ViT-S recipe for an "
                                       "ImageFolder, a small CPU preset for the built-in sets)")
    helps = _config_help()
    for field in dataclasses.fields(pqcl.Config):
        flag, default = "--" + field.name.replace("_", "-"), field.default
        kwargs = dict(default=None, help=f"{helps.get(field.name, '')} (recipe: {default})")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(nargs=len(default), type=float, metavar=("MIN", "MAX"))
        else:
            kwargs["type"] = type(default)
        method.add_argument(flag, **kwargs)
    return parser


def config_from_args(args):
    given = {f.name: tuple(v) if isinstance(v, list) else v for f in dataclasses.fields(pqcl.Config)
             if (v := getattr(args, f.name)) is not None}
    base = dict(EMBEDDED) if args.data in BUILTIN_DATASETS else {}
    try:
        return pqcl.Config(**{**base, **given})
    except ValueError as error:
        name, _, fix = str(error).partition(": ")
        raise UsageError(f"--{name.replace('_', '-')}: {fix}") from None


# --------------------------------------------------------------------------------------
# Checkpoints: tensors and plain dicts, written atomically, read with weights_only=True
# --------------------------------------------------------------------------------------


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a reader sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no checkpoint there; check the path (or drop --resume to start afresh)") from None
    except Exception as error:
        raise UsageError(f"{path}: not a readable PQCL checkpoint ({type(error).__name__}); "
                         "pass the checkpoint.pth that train_ddp.py wrote") from None


def backbone_state(checkpoint):
    """Teacher backbone with timm's names: no `mask_token` (pretraining only), no prefixes."""
    if "teacher" not in checkpoint:  # already an exported backbone
        return {k: v for k, v in checkpoint.items() if k != "mask_token"}
    return {k.removeprefix("backbone."): v for k, v in checkpoint["teacher"].items()
            if k.startswith("backbone.") and k != "backbone.mask_token"}


def export_backbone(checkpoint_path, out_path):
    save_atomic(backbone_state(load_checkpoint(checkpoint_path)), out_path)


def backbone_from_checkpoint(path):
    """A checkpoint.pth or an exported backbone.pth -> (teacher VisionTransformer, Config or None)."""
    checkpoint = load_checkpoint(path)
    state = backbone_state(checkpoint)
    cfg = pqcl.Config(**checkpoint["config"]) if "config" in checkpoint else None
    embed_dim = state["pos_embed"].shape[-1]
    arch = cfg.arch if cfg else next((a for a, (d, _, _) in pqcl.ARCHS.items() if d == embed_dim), None)
    if arch is None:
        raise UsageError(f"{path}: width {embed_dim} matches no architecture in {sorted(pqcl.ARCHS)}")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    backbone = pqcl.build_backbone(arch, depth, img_size=grid * patch, patch_size=patch)
    backbone.load_state_dict(state)
    return backbone.eval(), cfg


# --------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------


def make_optimizer(model, device):
    """AdamW; biases and 1-D parameters (norms) are never decayed (DINO's groups)."""
    decay, no_decay = [], []
    for name, p in model.student.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, fused=device.type in ("cuda", "cpu"))


def compile_model(model):
    """torch.compile, in place, the transformer blocks and the heads: the compute. The glue
    between them (masking, token selection, losses) has data-dependent shapes."""
    for module in [*model.student.backbone.blocks, *model.teacher.backbone.blocks,
                   *model.student.heads.values(), *model.teacher.heads.values()]:
        module.compile()


def train_step(model, optimizer, batch, step, steps_per_epoch, world_size=1, amp_dtype=None, scaler=None,
               forward=None):
    """One optimizer step of PQCL at global step `step`: schedules, forward under autocast,
    backward, per-tensor grad clip, last-layer freeze, AdamW, EMA. Returns the loss terms
    (tensors: nothing here waits for the device). `forward` is the DDP wrapper if any."""
    cfg = model.cfg
    lr = pqcl.learning_rate(cfg, step, steps_per_epoch, world_size)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.param_groups[0]["weight_decay"] = pqcl.weight_decay(cfg, step, steps_per_epoch)
    device_type = batch["globals"].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        terms = (forward or model)(batch, teacher_temp=pqcl.teacher_temperature(cfg, step, steps_per_epoch))
    if scaler is not None:
        scaler.scale(terms["loss"]).backward()
        scaler.unscale_(optimizer)
    else:
        terms["loss"].backward()
    params = [p for p in model.student.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)  # DINO clips each parameter tensor on its own
    torch._foreach_mul_(grads, [torch.clamp(cfg.clip_grad / (n + 1e-6), max=1.0) for n in norms])
    if step < cfg.freeze_last_layer_epochs * steps_per_epoch:
        for name, p in model.student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_teacher(pqcl.teacher_momentum(cfg, step, steps_per_epoch))
    return {k: v.detach() for k, v in terms.items()}


# --------------------------------------------------------------------------------------
# k-NN evaluation (DINO protocol)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def frozen_tokens(backbone, images, batch_size=256):
    """uint8 images (n, 3, S, S) -> all output tokens of a frozen backbone, one chunk at a
    time: yields float32 CPU tensors (c, 1 + N, D), c <= batch_size (evaluate.py uses the patches)."""
    device = next(backbone.parameters()).device
    mean = torch.tensor(pqcl.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pqcl.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for chunk in images.split(batch_size):
        yield backbone((chunk.to(device).float() / 255 - mean) / std).float().cpu()


def cls_features(backbone, images, batch_size=256):
    """uint8 images (n, 3, S, S) -> l2-normalised [CLS] features (n, D) of a frozen backbone."""
    return torch.cat([F.normalize(tokens[:, 0], dim=-1) for tokens in frozen_tokens(backbone, images, batch_size)])


def knn_top1(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07, chunk=1024):
    """Weighted k-NN (DINO): cosine similarity to the k nearest training features, votes
    weighted by exp(sim / T); top-1 accuracy in percent. Chunked over the test set."""
    num_classes = int(train_labels.max()) + 1
    correct = 0
    for features, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        sims, neighbours = (features @ train_features.T).topk(k, dim=1)  # (c, k)
        votes = torch.zeros(len(features), num_classes).scatter_add_(
            1, train_labels[neighbours], (sims / temperature).exp())
        correct += (votes.argmax(1) == labels).sum().item()
    return 100.0 * correct / len(test_labels)


def knn_eval(backbone, train, test, k=20):
    train_images, train_labels, _ = train
    test_images, test_labels, _ = test
    return knn_top1(cls_features(backbone, train_images), train_labels, cls_features(backbone, test_images),
                    test_labels, k=k)


# --------------------------------------------------------------------------------------
# Training run
# --------------------------------------------------------------------------------------


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank() if world_size > 1 else 0, world_size, device


def all_ranks_sum(values):
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def default_workers():
    """Data workers per process: this node's cores shared among its processes, one kept for the
    training loop. One worker augments tens of images/s (bench.py); a GPU step eats thousands."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def release_freed_memory():
    """glibc keeps the holes that CPU tensors of varying size (masked-token counts change
    every step) leave in its heap: without this a CPU run grows by ~30 MB a step."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class Progress:
    """Rank 0's log: one JSON object per interval in log.jsonl and a live line on stdout."""

    def __init__(self, output_dir, total_steps, start_step, global_batch):
        self.file = open(os.path.join(output_dir, "log.jsonl"), "a")
        self.total_steps, self.start_step, self.global_batch = total_steps, start_step, global_batch
        self.interactive = sys.stdout.isatty()
        self.run_start = self.interval_start = time.perf_counter()
        self.skipped = 0

    def write(self, step, epoch, losses, skipped, interval_steps, optimizer, cfg, steps_per_epoch, peak_memory):
        now = time.perf_counter()
        step_time = (now - self.interval_start) / interval_steps
        self.interval_start, self.skipped = now, self.skipped + skipped
        record = {"step": step, "epoch": epoch, **losses, "lr": optimizer.param_groups[0]["lr"],
                  "weight_decay": optimizer.param_groups[0]["weight_decay"],
                  "momentum": pqcl.teacher_momentum(cfg, step - 1, steps_per_epoch),
                  "teacher_temp": pqcl.teacher_temperature(cfg, step - 1, steps_per_epoch),
                  "student_temp": cfg.student_temp, "images_per_s": self.global_batch / step_time,
                  "step_time_s": step_time, "peak_memory_mb": peak_memory, "skipped_images": self.skipped}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        eta = (now - self.run_start) / (step - self.start_step) * (self.total_steps - step)
        line = (f"step {step}/{self.total_steps} ep {epoch} | loss {losses['loss']:.3f} (cls {losses['cls']:.3f} "
                f"patch {losses['patch']:.3f} query {losses['query']:.3f}) | {record['images_per_s']:.1f} img/s | "
                f"ETA {format_duration(eta)}" + (f" | skipped {self.skipped} unreadable images" if self.skipped else ""))
        print(("\r" + line + "\033[K") if self.interactive else line, end="" if self.interactive else "\n", flush=True)

    def finish(self, step):
        self.file.close()
        print(("\n" if self.interactive else "")
              + f"trained {step - self.start_step} steps in {format_duration(time.perf_counter() - self.run_start)}"
              + (f"; skipped {self.skipped} unreadable images" if self.skipped else ""), flush=True)


def train(args, stop_requested):
    """Pretrain; `stop_requested` turns non-empty on SIGTERM. -> (cfg, built-in splits or None)"""
    rank, world_size, device = setup_distributed()
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    checkpoint = load_checkpoint(checkpoint_path) if args.resume else None
    cfg = pqcl.Config(**checkpoint["config"]) if checkpoint else config_from_args(args)
    # everything that can fail on bad input happens before anything is written
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a GPU (gradient scaling); use bf16 or fp32 on the CPU")
    if args.data in BUILTIN_DATASETS:
        splits = BUILTIN_DATASETS[args.data](cfg.seed, cfg.img_size)
        source = InMemoryImages(splits[0][0])
    else:
        splits, source = None, ImageFiles(args.data)
    num_images = min(args.subset, len(source)) if args.subset else len(source)  # the sampler draws from these
    sampler = ResumableSampler(num_images, cfg.batch_size, cfg.seed, rank, world_size)
    if sampler.steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} x {world_size} processes exceeds the {num_images} "
                         "images; lower --batch-size")
    workers = args.workers if args.workers >= 0 else (0 if args.data in BUILTIN_DATASETS else default_workers())

    torch.manual_seed(cfg.seed)
    model = pqcl.PQCL(cfg).to(device)
    optimizer = make_optimizer(model, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    step = 0
    if checkpoint:
        model.student.load_state_dict(checkpoint["student"])
        model.teacher.load_state_dict(checkpoint["teacher"])
        for name, center in checkpoint["centers"].items():
            getattr(model, name).copy_(center)
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        step = checkpoint["step"]
    if args.compile:
        compile_model(model)
    forward = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False) if world_size > 1 else model
    dataset = Augmented(source, pqcl.PQCLAugmentation.from_config(cfg), cfg.seed)
    loader_kwargs = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                         prefetch_factor=4 if workers else None)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    def state(epoch):  # drop path is reseeded from (seed, rank, step), so `step` is the RNG state too
        return {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                "centers": {n: getattr(model, n) for n in ("center_cls", "center_patch", "center_query")},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                "config": dataclasses.asdict(cfg), "epoch": epoch, "step": step, "world_size": world_size}

    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        print(f"PQCL-{cfg.framework} ({f'lambda {cfg.query_weight}' if cfg.use_queries else 'baseline, no queries'}) "
              f"{cfg.arch}{f' depth {cfg.depth}' if cfg.depth else ''}/{cfg.patch_size} at {cfg.img_size} px on "
              f"{args.data}: {num_images} images, {world_size} x {device.type}, "
              f"{precision}, global batch {cfg.batch_size * world_size}, {total_steps} steps"
              + (f", resuming at step {step}" if checkpoint else ""), flush=True)
    log = Progress(args.output_dir, total_steps, step, cfg.batch_size * world_size) if rank == 0 else None
    running = torch.zeros(5, device=device)  # since the last sync: sums of loss, cls, patch, query; skipped images
    interval_steps = 0

    epoch = step // steps_per_epoch
    while step < total_steps:
        sampler.epoch, sampler.start_step = epoch, step - epoch * steps_per_epoch
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **loader_kwargs)
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            torch.manual_seed(cfg.seed * 1_000_003 + rank * 10_007 + step)  # drop path: a function of the step
            terms = train_step(model, optimizer, batch, step, steps_per_epoch, world_size, amp_dtype, scaler, forward)
            step += 1
            interval_steps += 1
            running += torch.stack([terms["loss"], terms["cls"], terms["patch"], terms["query"],
                                    batch["skipped"].sum().to(running.dtype)])
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            log_now = step % args.log_every == 0 or end_of_epoch
            save_now = step % args.ckpt_every == 0 or end_of_epoch
            if not (log_now or save_now or (stop_requested and world_size == 1)):
                continue
            # sync point: every rank agrees on the loss, finiteness and a pending SIGTERM
            if device.type == "cpu":
                release_freed_memory()
            params_finite = torch.stack(torch._foreach_norm(list(model.student.parameters()))).isfinite().all()
            totals = all_ranks_sum(torch.cat([running, torch.stack([(~params_finite).float(),
                                                                   torch.tensor(float(bool(stop_requested)), device=device)])]))
            if not totals[:4].isfinite().all() or totals[5] > 0:
                raise FloatingPointError(f"non-finite loss or weights near step {step}; the last good checkpoint in "
                                         f"{args.output_dir} is untouched. Lower --lr or use --precision fp32.")
            stop = totals[6] > 0
            if log_now or stop:
                if log is not None:
                    means = (totals[:4] / (interval_steps * world_size)).tolist()
                    log.write(step, epoch, dict(zip(("loss", "cls", "patch", "query"), means)), int(totals[4]),
                              interval_steps, optimizer, cfg, steps_per_epoch, peak_memory_mb(device))
                running.zero_()
                interval_steps = 0
            if save_now or stop:
                if rank == 0:
                    save_atomic(state(step // steps_per_epoch), checkpoint_path)
            if stop:
                if rank == 0:
                    print(f"\nstopped by SIGTERM at step {step}; continue with --resume", flush=True)
                return cfg, None
            if step >= total_steps:
                break
        epoch += 1
    if rank == 0:
        log.finish(step)
        export_backbone(checkpoint_path, os.path.join(args.output_dir, "backbone.pth"))
    return cfg, splits


def evaluate_builtin(cfg, splits, backbone, output_dir, max_train=10_000):
    """k-NN of the trained teacher and of the initialisation it started from, on the test split
    (training features from the first `max_train` images of the training split)."""
    torch.manual_seed(cfg.seed)
    random_backbone = pqcl.PQCL(cfg).teacher.backbone.eval()  # the initialisation training started from
    train = tuple(part[:max_train] if part is not None else None for part in splits[0])
    start = time.perf_counter()
    result = {"knn_top1": knn_eval(backbone, train, splits[1]), "knn_top1_random_init": knn_eval(random_backbone, train, splits[1]),
              "k": 20, "temperature": 0.07, "train_images": len(train[0]), "test_images": len(splits[1][0])}
    save_atomic_json(result, os.path.join(output_dir, "eval.json"))
    print(f"k-NN top-1 on the held-out split (k=20, T=0.07): trained teacher {result['knn_top1']:.1f}% | "
          f"random init {result['knn_top1_random_init']:.1f}% ({time.perf_counter() - start:.0f}s)", flush=True)
    return result


def save_atomic_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.export:
            export_backbone(*args.export)
            print(f"wrote the teacher backbone of {args.export[0]} to {args.export[1]}")
            return 0
        stop_requested = []  # preemption: save at the next sync point and exit cleanly
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
        try:
            cfg, splits = train(args, stop_requested)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        if splits is not None and args.eval and (not dist.is_initialized() or dist.get_rank() == 0):
            backbone, _ = backbone_from_checkpoint(os.path.join(args.output_dir, "backbone.pth"))
            evaluate_builtin(cfg, splits, backbone, args.output_dir)
        return 0
    except UsageError as error:
        print(f"train_ddp.py: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"\ntrain_ddp.py: {error}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
