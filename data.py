"""Where images come from and how they become training samples.

    built-in sets    the embedded shapes (generated, with per-pixel labels) and Fashion-MNIST
                     (Debian's IDX files), each with the CPU preset that learns on it in minutes
    ImageFolder      any tree of image files (ImageNet's train/), unreadable files skipped
    evaluation sets  ROOT/train and ROOT/val ImageFolder trees with labels, DINO's preprocessing
    SeededSamples    (epoch, index) -> the augmented sample, seeded by (seed, epoch, index) alone
    ResumableSampler each rank's share of a seeded permutation, from any step of any epoch

The method's view recipe (pqcl.PQCLAugmentation, the positions) lives in pqcl.py; this
module adds only what makes it fast (CPUAugmentation: PIL's blur, JPEGs decoded at reduced
size where every crop allows it; the separable blur for tensors) and feeds it images.
"""
import argparse
import dataclasses
import gzip
import math
import os
import signal
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

import pqcl


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors (every command's one-line error and exit 2)."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


# --------------------------------------------------------------------------------------
# The embedded dataset: shapes on textured backgrounds, with per-pixel labels
# --------------------------------------------------------------------------------------

EMBEDDED_TRAIN, EMBEDDED_TEST = 6000, 1000  # images in the embedded splits


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
    is not learnt in a short run. Without the negatives the default run's [CLS] targets collapse to
    uniform and its k-NN gain falls from +10.8 to +3.7: the polarity is what spreads a random ViT's
    [CLS] outputs at the start; docs/tuning.md, fourth round.)
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


# CPU presets: the authors' recipe (pqcl.Config's defaults), except where a run of minutes on
# 2 cores needs otherwise. The comments give the default run's k-NN top-1 (%, seed 0; random
# init 20.2) for the alternatives tried, on the CPU path (--augment-on cpu, the default then);
# docs/tuning.md has every run of eleven rounds, most read off the collapse monitors; only the
# fifth's KoLeo term and the seventh's lr beat these values on three seeds or more.
EMBEDDED = dict(
    arch="vit_tiny", depth=4, img_size=32, patch_size=4, query_size=12,  # 8 x 8 patches, 3 x 3 query patches
    global_scale=(0.4, 1.0), drop_path_rate=0.0, out_dim=1024, hidden_dim=512, bottleneck_dim=128,
    epochs=2, batch_size=64, warmup_epochs=1,  # 3 epochs: +0.8 ± 4.3 and +0.3 ± 6.4 on nine seed-runs (tuning.md, rounds 8, 9)
    lr=3e-3,  # x 64 / 256 = 7.5e-4 applied; with KoLeo +2.6 over 4e-3 on seeds 0-5 (tuning.md, seventh round);
    # before KoLeo 4e-3 gave 29.9 here, 27.3 at 8e-3, 24.8 at 1e-3
    teacher_temp=0.07, warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=0,  # 29.9; 25.9 at 0.1, 21.0 at 0.04
    momentum_teacher=0.95,  # 29.9; 23.6 at 0.9; at 0.99 the teacher lags ~100 of the run's 186 steps
    freeze_last_layer_epochs=0,
    koleo_weight=0.5)  # DINOv2's KoLeo: +1.7, +1.0, +1.1 on seeds 0, 1, 2 (tuning.md, fifth round); 0.1 and 1.0 lower
# Fashion-MNIST: the embedded preset on a 4 x 4 grid of 8-px patches, query crops of 2 x 2 patches
# (the embedded 8 x 8 grid learns more per step, 936 steps on 30000 images: 68.9 against 54.5 at
# its random init, but costs 3x as much per step), then three epochs of the 60000 images (2811
# steps) at lr 2e-3 (half the embedded preset's lr of then) with sharper teacher targets (0.05). k-NN % against 68.2 at
# random init (docs/tuning.md): two epochs as the embedded preset 75.2 in 13 min (Zen 5 EPYC, bf16);
# a third epoch 77.5 in 21 min; lr 2e-3 76.5; three epochs at lr 2e-3 77.9 (Xeon with AMX); and
# teacher temperature 0.05 too, this preset: 78.6 in 17 min 17 s there, 79.0 in 19 min 29 s on the
# Zen 5 EPYC (2026-12-03, bf16, 2 threads, idle), where the same recipe over two epochs gives 77.2 in 12 min.
FASHION_MNIST_PRESET = dict(EMBEDDED, patch_size=8, query_size=16, epochs=3, lr=2e-3, teacher_temp=0.05,
                            warmup_teacher_temp=0.05, koleo_weight=0.0)  # KoLeo not tried on it
PRESETS = {"recipe": {}, "embedded": EMBEDDED, "fashion-mnist": FASHION_MNIST_PRESET}


def default_preset(data):
    """A built-in set trains with its own preset, an ImageFolder with the recipe."""
    return data if data in BUILTIN_DATASETS else "recipe"


def preset_config(preset, **overrides):
    """pqcl.Config of a preset, with `overrides` on top."""
    return pqcl.Config(**{**PRESETS[preset], **overrides})


# --------------------------------------------------------------------------------------
# Images: an ImageFolder tree, or a built-in set held in memory
# --------------------------------------------------------------------------------------


class DraftedImage(NamedTuple):
    """A JPEG decoded at 1/reduction of its size by DCT scaling (PIL's draft): source pixel x
    lies at x / reduction in `pixels` ((W + r - 1) // r wide), so boxes stay in source pixels."""
    pixels: Image.Image
    width: int  # the source's size (px)
    height: int
    reduction: int  # 2, 4 or 8


class ImageFiles(Dataset):
    """An ImageFolder tree (one subfolder per class) read with PIL; unreadable files are
    replaced by the next readable one and counted: index -> (PIL image, files passed over).
    With `reduction` ((width, height) -> 1, 2, 4 or 8, e.g. CPUAugmentation.draft_reduction),
    a JPEG is decoded at that reduced size and comes as a DraftedImage."""

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, root, reduction=None):
        self.reduction = reduction
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

    def __getitem__(self, index):
        for skipped in range(len(self.paths)):
            path = self.paths[(index + skipped) % len(self.paths)]
            try:
                with Image.open(path) as image:
                    return self._decode(image), skipped
            except Exception as error:  # corrupt, truncated or unreadable: skip it, report it
                print(f"warning: skipping unreadable image {path}: {error}", file=sys.stderr)
        raise RuntimeError("no readable image in the dataset")

    def _decode(self, image):
        width, height = image.size
        reduction = self.reduction(width, height) if self.reduction and image.format == "JPEG" else 1
        drafted = image.draft("RGB", (width // reduction, height // reduction)) if reduction > 1 else None
        reduction = round(width / drafted[1][2]) if drafted else 1  # the scale PIL chose: box = source / scale
        pixels = image.convert("RGB")
        return DraftedImage(pixels, width, height, reduction) if reduction > 1 else pixels


class InMemoryImages(Dataset):
    """uint8 images (n, 3, S, S): index -> (image (3, S, S), 0 files passed over)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], 0


# --------------------------------------------------------------------------------------
# Evaluation images: ROOT/train and ROOT/val ImageFolder trees with class labels
# --------------------------------------------------------------------------------------


def eval_transform(img_size):
    """DINO's evaluation preprocessing scaled to `img_size` (256 -> 224 at 224 px): PIL image ->
    short side resized to 256/224 of img_size (bicubic), centre crop -> uint8 (3, S, S). The
    ImageNet normalisation follows on the device (evaluate.frozen_tokens), as for built-in sets."""
    return T.Compose([T.Resize(round(img_size * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), T.PILToTensor()])


def linear_train_transform(img_size):
    """DINO's linear-probe training augmentation: PIL image -> uint8 (3, S, S)."""
    return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.PILToTensor()])


def labelled_sample(transform, image_and_label):
    """(PIL image, class index) -> {"images": transform(image), "labels": class index}: the
    augment of an Augmented ClassifiedImages (a module-level function: workers can pickle it)."""
    image, label = image_and_label
    return {"images": transform(image), "labels": label}


class ClassifiedImages(Dataset):
    """A torchvision ImageFolder's files, its transform left out, as an Augmented source:
    index -> ((PIL image, class index), 0 files passed over)."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, index):
        path, label = self.folder.samples[index]
        return (self.folder.loader(path), label), 0


def image_folder_splits(root, flag="--data", transform=None):
    """ROOT/train and ROOT/val, ImageFolder trees with the same class folders, none empty ->
    (train, val) torchvision ImageFolders: index -> (transform(PIL image), class index)."""
    fix = "give a folder holding train/ and val/ ImageFolder trees (one subfolder per class, the same in both)"
    splits = {}
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            raise UsageError(f"{flag} {root}: has no {split}/ folder; {fix}")
        classes = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        if not classes:
            raise UsageError(f"{flag} {root}: {split}/ holds no class folders; {fix}")
        splits[split] = ImageFolder(path, transform=transform, allow_empty=True)
        counts = torch.bincount(torch.tensor(splits[split].targets, dtype=torch.long), minlength=len(classes))
        empty = [name for name, count in zip(splits[split].classes, counts.tolist()) if count == 0]
        if empty:
            raise UsageError(f"{flag} {root}: {split}/{empty[0]} holds no images"
                             f"{f' (nor {len(empty) - 1} other classes)' if len(empty) > 1 else ''}; "
                             "add images or remove the class from both train/ and val/")
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:
        only_train, only_val = sorted(set(train.classes) - set(val.classes)), sorted(set(val.classes) - set(train.classes))
        raise UsageError(f"{flag} {root}: train/ and val/ have different class folders (only in train/: "
                         f"{only_train[:3] or 'none'}, only in val/: {only_val[:3] or 'none'}); make them the same")
    return train, val


# --------------------------------------------------------------------------------------
# Training samples: reproducible per-sample augmentation, resumable sampling
# --------------------------------------------------------------------------------------


class SeparableGaussianBlur(T.GaussianBlur):
    """T.GaussianBlur (same kernel size, same random sigma) as two 1-D passes. The 2-D kernel
    is the outer product of the 1-D one, so the result is the same up to rounding (one grey
    level at most) at a third of the cost: the 2-D blur was 3/4 of a data worker's time."""

    def transform(self, image, params):  # PIL image or tensor (..., C, H, W)
        pixels = image if torch.is_tensor(image) else TF.pil_to_tensor(image)
        size, sigma, channels = self.kernel_size[0], params["sigma"][0], pixels.shape[-3]
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
        weights = weights / weights.sum()  # (k,)
        x = F.pad(pixels.reshape(-1, *pixels.shape[-3:]).float(), [size // 2] * 4, mode="reflect")  # (n, C, H+k-1, W+k-1)
        x = F.conv2d(x, weights.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)  # along rows
        x = F.conv2d(x, weights.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)  # along columns
        if not pixels.is_floating_point():
            x = x.round_().clamp_(0, 255)
        x = x.to(pixels.dtype).reshape(pixels.shape)
        return x if torch.is_tensor(image) else TF.to_pil_image(x)


class PILGaussianBlur(SeparableGaussianBlur):
    """T.GaussianBlur's random sigma; a PIL image is blurred by PIL's GaussianBlur with radius =
    sigma, as DINO's and BYOL's reference code do, and stays uint8 in PIL. That is an extended
    box blur (three box passes whose variance is exactly sigma^2, so a piecewise-quadratic kernel
    rather than a Gaussian) with edges extended rather than reflected and no kernel truncation.
    Tensors (the in-memory sets) keep the exact separable Gaussian: their samples are unchanged."""

    def transform(self, image, params):
        if torch.is_tensor(image):
            return super().transform(image, params)
        return image.filter(ImageFilter.GaussianBlur(radius=params["sigma"][0]))


class CPUAugmentation(pqcl.PQCLAugmentation):
    """pqcl.PQCLAugmentation that also takes a DraftedImage: boxes are drawn in source pixels
    (the same draws as from the full image) and scaled into the drafted image to crop."""

    @staticmethod
    def draw_box(image, scale):
        if isinstance(image, DraftedImage):  # RandomResizedCrop reads only the size: a tensor of no pixels has it
            image = torch.empty(0, image.height, image.width)
        return pqcl.PQCLAugmentation.draw_box(image, scale)

    @staticmethod
    def crop(image, box, size, flip):
        if not isinstance(image, DraftedImage):
            return pqcl.PQCLAugmentation.crop(image, box, size, flip)
        top, left, height, width = (side / image.reduction for side in box)  # in the drafted image's pixels
        # PIL resamples a fractional box directly (bicubic, antialiased), reading beyond the box
        # at its borders where crop-then-resize would clamp
        view = image.pixels.resize((size, size), Image.BICUBIC, box=(left, top, left + width, top + height))
        return TF.hflip(view) if flip else view

    def draft_reduction(self, width, height):
        """The largest JPEG reduction (8, 4, 2; else 1) at which every box draw_box can draw from a
        width x height image still spans its view's size in pixels, so every resize still shrinks.
        A box has sides >= sqrt(area * min scale * 3/4) (aspect 3/4 to 4/3; less a pixel for
        rounding), or is RandomResizedCrop's fallback, sides >= min(width, height)."""
        views = [(self.global_size, self.global_scale[0])]
        views += [(self.query_size, self.query_scale[0])] if self.num_queries else []
        views += [(self.local_size, self.local_scale[0])] if self.num_locals else []
        shortest = [min(width, height, math.floor(math.sqrt(width * height * min_scale * 3 / 4)) - 1)
                    for _, min_scale in views]  # the shortest side of any box, per view
        for reduction in (8, 4, 2):
            if all(side >= size * reduction for side, (size, _) in zip(shortest, views)):
                return reduction
        return 1


# --------------------------------------------------------------------------------------
# The device path (--augment-on device): geometry in the workers, photometry batched on the device
# --------------------------------------------------------------------------------------

# Columns of a view's photometric parameters, as the worker draws them (PhotometricRecipe.draw)
JITTER, FACTORS, ORDER, GRAYSCALE, BLUR, SIGMA, SOLARIZE = 0, slice(1, 5), slice(5, 9), 9, 10, 11, 12
PARAMETERS = 13  # FACTORS: brightness, contrast, saturation, hue; ORDER: a permutation of those four
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # the adjustments' indices in FACTORS and ORDER


@dataclasses.dataclass(frozen=True)
class PhotometricRecipe:
    """One view's pixel pipeline (a pqcl.PQCLAugmentation Compose) as numbers: what the worker
    draws from and what the device applies. Read off the Compose, so the device path follows
    the recipe wherever pqcl.py sets it."""
    jitter_p: float  # RandomApply(ColorJitter) p
    ranges: tuple  # ColorJitter's brightness, contrast, saturation, hue factor ranges ((min, max) each)
    grayscale_p: float
    blur_p: float
    kernel_size: int  # the Gaussian blur's, px
    sigma: tuple  # (min, max), px
    solarize_p: float  # 0 where the view has no RandomSolarize
    solarize_threshold: float  # uint8 grey levels: pixels >= it are inverted
    mean: tuple  # Normalize's, per channel
    std: tuple

    @classmethod
    def of(cls, pipeline):
        found = dict(solarize_p=0.0, solarize_threshold=128.0)
        for transform in pipeline.transforms:
            inner = transform.transforms[0] if isinstance(transform, T.RandomApply) else None
            if isinstance(inner, T.ColorJitter):
                found.update(jitter_p=transform.p, ranges=(inner.brightness, inner.contrast, inner.saturation, inner.hue))
            elif isinstance(inner, T.GaussianBlur):
                found.update(blur_p=transform.p, kernel_size=inner.kernel_size[0], sigma=tuple(inner.sigma))
            elif isinstance(transform, T.RandomGrayscale):
                found.update(grayscale_p=transform.p)
            elif isinstance(transform, T.RandomSolarize):
                found.update(solarize_p=transform.p, solarize_threshold=float(transform.threshold))
            elif isinstance(transform, T.Normalize):
                found.update(mean=tuple(transform.mean), std=tuple(transform.std))
            elif not isinstance(transform, (T.ToImage, T.ToDtype)):
                raise ValueError(f"the device path has no batched form of {transform}")
        return cls(**found)

    def draw(self):
        """This view's parameters from torch's global generator -> (PARAMETERS,) float32. Every
        parameter is drawn, applied or not, so each view consumes the same random numbers."""
        jitter = torch.rand(1) < self.jitter_p  # (1,) as RandomApply: applied when rand < p
        order = torch.randperm(4)  # ColorJitter's fn_idx: the order of the four adjustments
        factors = torch.cat([torch.empty(1).uniform_(low, high) for low, high in self.ranges])  # (4,)
        grayscale, blur = torch.rand(1) < self.grayscale_p, torch.rand(1) < self.blur_p
        sigma = torch.empty(1).uniform_(*self.sigma)
        solarize = torch.rand(1) < self.solarize_p
        return torch.cat([jitter, factors, order, grayscale, blur, sigma, solarize]).float()


class PhotometricDraw:
    """Stands in for one view's pixel pipeline in the worker: appends the view's drawn
    parameters to `drawn` and returns the view, geometry only, as uint8 (3, s, s)."""

    def __init__(self, recipe, drawn):
        self.recipe, self.drawn = recipe, drawn

    def __call__(self, view):
        self.drawn.append(self.recipe.draw())
        return view if torch.is_tensor(view) else TF.pil_to_tensor(view)


VIEW_KINDS = ("globals", "queries", "locals")


class DeviceAugmentation(CPUAugmentation):
    """The worker's half of --augment-on device: CPUAugmentation's decoding and geometry (boxes,
    resize, flips; masks and positions as ever), each view returned as uint8 with every
    photometric parameter drawn for it, in the sample under "<kind>_photometric" (n, PARAMETERS).
    The draws come from torch's global generator right after the view's geometry, as the CPU
    path's are, so they depend on (seed, epoch, index) alone (Augmented), never on the device.
    `photometric` is the device's half, applied to the collated batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipes = {"globals": [PhotometricRecipe.of(pixels) for pixels in self.global_pixels],
                        "queries": [PhotometricRecipe.of(self.query_pixels)],
                        "locals": [PhotometricRecipe.of(self.local_pixels)]}
        applied = {(r.kernel_size, r.solarize_threshold, r.mean, r.std) for r in self.recipes["globals"]}
        if len(applied) > 1:
            raise ValueError("the global views differ in blur kernel, solarize threshold or normalisation")
        self._drawn = []  # the current sample's parameters, in draw order: globals, queries, locals
        self.global_pixels = [PhotometricDraw(recipe, self._drawn) for recipe in self.recipes["globals"]]
        self.query_pixels = PhotometricDraw(self.recipes["queries"][0], self._drawn)
        self.local_pixels = PhotometricDraw(self.recipes["locals"][0], self._drawn)

    def __call__(self, image):
        sample = super().__call__(image)
        drawn = torch.stack(self._drawn)  # (V + Q + N, PARAMETERS)
        self._drawn.clear()
        counts = [len(self.global_pixels), self.num_queries, self.num_locals]
        for kind, parameters in zip(VIEW_KINDS, drawn.split(counts)):
            sample[kind] = sample[kind].to(torch.uint8)  # (n, 3, s, s); an empty kind comes as float zeros
            sample[f"{kind}_photometric"] = parameters  # (n, PARAMETERS)
        return sample

    def photometric(self, batch):
        """The device's half, on a collated batch already on the training device: colour jitter,
        grayscale, blur, solarisation and normalisation of every view with its own parameters.
        -> the batch with normalised float32 views and the parameters removed."""
        batch = dict(batch)
        for kind in VIEW_KINDS:
            views, parameters = batch[kind], batch.pop(f"{kind}_photometric")  # (B, n, 3, s, s) uint8, (B, n, PARAMETERS)
            batch[kind] = photometric(views.flatten(0, 1), parameters.flatten(0, 1), self.recipes[kind][0]).view(views.shape)
        return batch


# The batched ops: float views (n, 3, H, W) in [0, 1], one parameter per view (n,). Each equals
# torchvision.transforms.v2.functional's op on one float image at that parameter; none
# leaves the views' device or waits for it (no tensor from a Python list, no .item()).


def per_view(values):  # (n,) -> (n, 1, 1, 1), broadcast over a view's pixels
    return values.view(-1, 1, 1, 1)


def grayscale(views):  # (n, 3, H, W) -> (n, 1, H, W): TF.rgb_to_grayscale's weights
    red, green, blue = views.unbind(1)
    return (0.2989 * red + 0.587 * green + 0.114 * blue)[:, None]


def blend(views, other, factors):  # TF's _blend: factor * views + (1 - factor) * other, clamped to [0, 1]
    # other: (n, 1 or 3, H, W) or a number
    return (per_view(factors) * views + (1 - per_view(factors)) * other).clamp(0, 1)


def jitter_blend(views, adjustments, factors):
    """ColorJitter's brightness, contrast and saturation (adjustments 0, 1, 2 as in FACTORS; any
    other index blends like brightness), each view its own, as the one blend they are: towards
    black, towards the view's mean grey level, towards each pixel's grey level."""
    grey = grayscale(views)  # (n, 1, H, W)
    towards = torch.where(per_view(adjustments == SATURATION), grey,
                          torch.where(per_view(adjustments == CONTRAST), grey.mean((1, 2, 3), keepdim=True), 0.0))
    return blend(views, towards, factors)


def adjust_hue(views, shifts):
    """Rotate each view's hue by its shift (turns, in [-0.5, 0.5]) through HSV, as TF.adjust_hue."""
    red, green, blue = views.unbind(1)  # (n, H, W) each
    value, low = views.amax(1), views.amin(1)  # (n, H, W)
    chroma = value - low
    safe_chroma = torch.where(chroma > 0, chroma, 1.0)
    sixths = torch.where(value == red, (green - blue) / safe_chroma,  # hue in sixths of a turn, in (-1, 5]
                         torch.where(value == green, 2 + (blue - red) / safe_chroma, 4 + (red - green) / safe_chroma))
    hue = (sixths / 6 + shifts.view(-1, 1, 1)) % 1  # (n, H, W), turns in [0, 1)
    saturation = chroma / torch.where(value > 0, value, 1.0)
    # HSV -> RGB: channel c = value * (1 - saturation * clamp(min(k, 4 - k), 0, 1)), k = (n_c + 6 hue) mod 6,
    # n = 5, 3, 1 for red, green, blue
    offsets = torch.arange(5, 0, -2, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
    k = (offsets + 6 * hue[:, None]) % 6  # (n, 3, H, W)
    return value[:, None] * (1 - saturation[:, None] * torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(views, sigmas, kernel_size):
    """Each view blurred by its own Gaussian (sigma px, kernel_size taps, reflected edges), as
    TF.gaussian_blur: the separable kernel as two grouped 1-D convolutions, one group per channel."""
    n, channels, height, width = views.shape
    offsets = torch.arange(kernel_size, device=views.device, dtype=views.dtype) - kernel_size // 2  # (k,)
    kernels = torch.softmax(-0.5 * (offsets / sigmas[:, None]) ** 2, dim=1)  # (n, k), each sums to 1
    kernels = kernels.repeat_interleave(channels, 0)  # (n * C, k), view-major like the channels below
    padded = F.pad(views, [kernel_size // 2] * 4, mode="reflect")  # (n, C, H + k - 1, W + k - 1)
    rows = F.conv2d(padded.reshape(1, n * channels, *padded.shape[2:]), kernels.view(-1, 1, 1, kernel_size),
                    groups=n * channels)  # (1, n * C, H + k - 1, W)
    return F.conv2d(rows, kernels.view(-1, 1, kernel_size, 1), groups=n * channels).view(n, channels, height, width)


def solarize(views, applied, threshold):  # invert the pixels >= threshold (in [0, 1]) of the applied views
    return torch.where(per_view(applied) & (views >= threshold), 1 - views, views)


def photometric(views, parameters, recipe):
    """uint8 views (n, 3, s, s) and their drawn parameters (n, PARAMETERS) -> normalised float32
    views (n, 3, s, s), in the CPU path's order: colour jitter (its four adjustments in the view's
    own order), grayscale, blur, solarisation, normalisation. Float throughout, rounded nowhere.
    At each of the jitter's four positions every view makes one blend (its own adjustment's, or
    one at factor 1, exact) and one hue rotation (its own, or by 0, ~1e-7 for the HSV round
    trip), so the batch is never split; grayscale, blur, solarisation are skipped by a select."""
    if views.numel() == 0:
        return views.float()
    views = views.float() / 255
    jitter, factors = parameters[:, JITTER].bool(), parameters[:, FACTORS]  # (n,), (n, 4)
    order = parameters[:, ORDER].long()  # (n, 4): the op at each position
    for position in range(4):
        adjustment = order[:, position]  # (n,) the adjustment each view makes at this position
        factor = factors.gather(1, adjustment[:, None]).squeeze(1)  # (n,) its drawn factor
        views = jitter_blend(views, adjustment, torch.where(jitter & (adjustment != HUE), factor, 1.0))
        views = adjust_hue(views, torch.where(jitter & (adjustment == HUE), factor, 0.0))
    views = torch.where(per_view(parameters[:, GRAYSCALE].bool()), grayscale(views).expand_as(views), views)
    views = torch.where(per_view(parameters[:, BLUR].bool()),
                        gaussian_blur(views, parameters[:, SIGMA], recipe.kernel_size), views)
    views = solarize(views, parameters[:, SOLARIZE].bool(), recipe.solarize_threshold / 255)
    return torch.stack([(channel - mean) / std for channel, mean, std in zip(views.unbind(1), recipe.mean, recipe.std)], 1)


BLURS = {"pil": PILGaussianBlur,  # the default: PIL's extended box blur on PIL images
         "exact": SeparableGaussianBlur}  # the exact (truncated) Gaussian, through a float tensor


def augmentation(cfg, blur="pil", on="cpu"):
    """The view recipe of `cfg` (pqcl.PQCLAugmentation) with the fast CPU path: `blur` names
    the Gaussian blur of PIL images (BLURS); tensors always get the exact separable one. With
    on="device", the device path's worker half (DeviceAugmentation; blur does not apply)."""
    return DeviceAugmentation.from_config(cfg) if on == "device" else CPUAugmentation.from_config(cfg, blur=BLURS[blur])


def leave_sigterm_to_the_main_process(worker_id):
    """worker_init_fn of the loaders that run inside training: a data worker ignores SIGTERM.
    A scheduler that signals the whole process group (SLURM on preemption) would otherwise kill
    the worker mid-batch and crash the run before the main process saves its checkpoint at the
    next step; the loader ends its workers itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Augmented(Dataset):
    """(epoch, index) -> the augmented sample, seeded by (seed, epoch, index) alone, so the
    data do not depend on worker count, rank or where a run was resumed."""

    def __init__(self, source, augment, seed):
        self.source, self.augment, self.seed = source, augment, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        image, skipped = self.source[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
            sample = self.augment(image)
        sample["skipped"] = skipped
        return sample


class ResumableSampler(Sampler):
    """Yields (epoch, index) for this rank: a permutation seeded by (seed, epoch), cut to a
    whole number of global batches and dealt round-robin over ranks, from the step that
    `set_position` names (epoch 0, step 0 at first)."""

    def __init__(self, size, batch_size, seed, rank=0, world_size=1):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.steps_per_epoch = size // (batch_size * world_size)
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch, start_step=0):
        """The next iteration yields epoch `epoch` from its step `start_step` on."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        order = order[: self.steps_per_epoch * self.batch_size * self.world_size][self.rank :: self.world_size]
        for index in order[self.start_step * self.batch_size :].tolist():
            yield self.epoch, index
