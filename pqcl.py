"""PQCL: Patch-level Contrastive Learning via Positional Query (Zhang et al., ICML 2023).

A self-supervised Vision Transformer is trained with iBOT (or DINO) plus one extra
task. Small "query crops" are cut from the image; the EMA teacher sees them with
pixels, the student sees them only as *positions*: one mask token per query patch
plus the sincos embedding of where that patch lies inside a global view (Eq. 4, 5).
Inside every block those query tokens cross-attend to the raw patches of the
global view (Eq. 6), and their head outputs must match the teacher's tokens of the
query crop (Eq. 8). No parameter is added to a plain ViT except the mask token.

This file follows the paper top to bottom:
    positions (Eq. 4) -> query-crop geometry (Fig. 2) -> block masks (iBOT)
    -> augmentation -> ViT with query cross-attention (Eq. 3, 5, 6)
    -> projection heads -> losses (Eq. 2, 8, 9) and centers -> PQCL module, EMA, schedules.

Shape legend, used in every comment:
    B  images in a batch          V  global views per image (2)
    Q  query crops per image      S, s  global / query view side in pixels
    G  patches per side of a global view (S / P), N = G * G patches
    l  patches per side of a query crop (s / P), L = l * l query patches
    P  patch size                 D  width, H heads, hd = D / H
    R  raw tokens = 1 + N ([CLS] + patches)       K  prototypes (head output)

Usage:
    cfg = Config(arch="vit_small")
    model = PQCL(cfg)
    augment = PQCLAugmentation.from_config(cfg)   # PIL image -> dict of tensors
    out = model(default_collate([augment(img) for img in images]))
    out["loss"].backward(); optimizer.step(); model.update_teacher(momentum)
"""
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.nn.utils.parametrizations import weight_norm

ARCHS = {  # name -> (embed_dim, depth, num_heads), the DeiT/timm sizes
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}
FRAMEWORKS = ("ibot", "dino")
HEAD_MODES = ("shared", "semi-shared", "vanilla")  # paper Table 7


def knob(default, help):
    """A Config field and its help text (train_ddp.py's --help prints it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """The method's knobs. Defaults are the authors' ViT-S/16, 100-epoch ImageNet recipe."""

    # backbone
    arch: str = knob("vit_small", "one of ARCHS")
    depth: int = knob(0, "transformer blocks; 0 = the architecture's own (12 for ViT-S); fewer for quick CPU runs")
    patch_size: int = knob(16, "P; 16 in every table of the paper")
    img_size: int = knob(224, "S, global view side")
    drop_path_rate: float = knob(0.1, "stochastic depth, student only (the teacher has none)")
    # views
    global_scale: tuple = knob((0.25, 1.0), "RandomResizedCrop area range of the 2 global views")
    query_size: int = knob(96, "s; 96 px = 6 x 6 query patches at P = 16 (paper Sec. 4.4)")
    query_scale: tuple = knob((0.05, 0.25), "area range of query crops; Table 4: insensitive to it")
    num_queries: int = knob(1, "Q query crops per image; the authors use 1")
    local_crops_number: int = knob(0, "N local crops through the student only, [CLS] only (DINO multi-crop); "
                                      "the authors' PQCL recipe uses none")
    local_crops_size: int = knob(96, "local crop side in pixels (DINO: 96 at 224)")
    local_crops_scale: tuple = knob((0.05, 0.4), "area range of the local crops (DINO)")
    query_as_local: bool = knob(False, "the paper's fair baseline (Sec. 4.4): the query crops, with pixels, "
                                       "also go through the student as local crops (L_local-global)")
    # objective
    framework: str = knob("ibot", "'ibot' adds the masked-patch term of Eq. 2, 'dino' has [CLS] only")
    query_weight: float = knob(1.0, "lambda of Eq. 9; 0 gives the plain iBOT / DINO baseline")
    patch_weight: float = knob(1.0, "lambda of Eq. 2 (iBOT's masked-patch weight)")
    koleo_weight: float = knob(0.0, "weight of DINOv2's KoLeo term on the student's global [CLS] tokens "
                                    "(not in the paper; 0 = off, DINOv2 uses 0.1); per process, so a DDP run "
                                    "is not one process on the global batch")
    mask_ratios: tuple = knob((0.0, 0.3), "iBOT pred_ratio: per view one is picked at random ...")
    mask_ratio_vars: tuple = knob((0.0, 0.2), "... and jittered by +- this: 0 or U(0.1, 0.5)")
    mask_aspect: tuple = knob((0.3, 1 / 0.3), "block aspect-ratio range (BEiT)")
    # heads
    head_mode: str = knob("shared", "Table 7: 'shared' is best; 'semi-shared' = shared teacher head only")
    out_dim: int = knob(8192, "K prototypes; Table 6 finds little difference from 4096 to 16384")
    hidden_dim: int = knob(2048, "head MLP width")
    bottleneck_dim: int = knob(256, "l2-normalised bottleneck before the weight-normalised last layer")
    norm_last_layer: bool = knob(False, "freeze the weight-norm gain; off for ViT-S (more stable when on)")
    # temperatures and centering
    student_temp: float = knob(0.1, "student softmax temperature, every term")
    teacher_temp: float = knob(0.07, "final teacher temperature; above 0.07 small ViTs can collapse")
    warmup_teacher_temp: float = knob(0.04, "start of the linear teacher-temperature warm-up (DINO's 0.04: "
                                            "sharp targets while the teacher is still random)")
    warmup_teacher_temp_epochs: int = knob(30, "length of the teacher-temperature warm-up")
    center_momentum: float = knob(0.9, "EMA of the teacher output means (one center per term)")
    # optimisation (AdamW with cosine schedules, as DINO/iBOT)
    epochs: int = knob(100, "pretraining epochs")
    batch_size: int = knob(64, "per process; the global batch is batch_size x world size")
    lr: float = knob(5e-4, "per 256 images: lr = lr x global_batch / 256 (linear scaling rule)")
    min_lr: float = knob(1e-6, "end of the cosine decay")
    warmup_epochs: int = knob(30, "linear lr warm-up (paper Sec. 4.1)")
    weight_decay: float = knob(0.04, "cosine from this ...")
    weight_decay_end: float = knob(0.4, "... to this; biases and norms are never decayed")
    momentum_teacher: float = knob(0.996, "EMA momentum, cosine to 1; raise to 0.9995 for batch 256")
    clip_grad: float = knob(3.0, "per-parameter-tensor gradient-norm clip, as DINO/iBOT; 0 = no clipping")
    freeze_last_layer_epochs: int = knob(1, "keep the heads' last layer fixed at the start: avoids collapse")
    seed: int = knob(0, "initialisation, data order, views and masks all follow from it")

    def __post_init__(self):
        def need(ok, param, fix):
            if not ok:
                raise ValueError(f"{param}: {fix}")

        need(self.arch in ARCHS, "arch", f"unknown architecture {self.arch!r}; use one of {sorted(ARCHS)}")
        need(self.framework in FRAMEWORKS, "framework", f"unknown framework {self.framework!r}; use 'ibot' or 'dino'")
        need(self.head_mode in HEAD_MODES, "head_mode", f"unknown head mode {self.head_mode!r}; use one of {HEAD_MODES}")
        need(self.depth >= 0, "depth", "must be >= 0 (0 = the architecture's own depth)")
        need(self.patch_size > 0, "patch_size", "must be a positive number of pixels")
        need(self.img_size % self.patch_size == 0, "img_size",
             f"{self.img_size} is not a multiple of patch_size {self.patch_size}; pick a multiple")
        need(self.query_size % self.patch_size == 0, "query_size",
             f"{self.query_size} is not a multiple of patch_size {self.patch_size}; pick a multiple")
        need(self.local_crops_number == 0 or self.local_crops_size % self.patch_size == 0, "local_crops_size",
             f"{self.local_crops_size} is not a multiple of patch_size {self.patch_size}; pick a multiple")
        need(self.local_crops_number >= 0, "local_crops_number", "must be >= 0")
        need(not self.query_as_local or self.num_queries > 0, "query_as_local", "needs num_queries >= 1")
        for name in ("global_scale", "query_scale", "local_crops_scale"):
            lo, hi = getattr(self, name)
            need(0 < lo <= hi <= 1, name, f"{(lo, hi)} must satisfy 0 < min <= max <= 1")
        need(self.num_queries >= 0, "num_queries", "must be >= 0")
        need(self.query_weight >= 0, "query_weight", "must be >= 0 (0 = plain baseline)")
        need(self.query_weight == 0 or self.num_queries > 0, "num_queries",
             "query_weight > 0 needs at least one query crop; set num_queries >= 1 or query_weight 0")
        need(len(self.mask_ratios) == len(self.mask_ratio_vars) > 0, "mask_ratio_vars",
             "give one variation per mask ratio")
        for ratio, var in zip(self.mask_ratios, self.mask_ratio_vars):
            need(0 <= var <= ratio and ratio + var < 1, "mask_ratios",
                 f"ratio {ratio} +- {var} must stay inside [0, 1); lower the ratio or its variation")
        need(0 < self.mask_aspect[0] <= self.mask_aspect[1], "mask_aspect", "must be 0 < min <= max")
        need(self.out_dim > 0 and self.hidden_dim > 0 and self.bottleneck_dim > 0, "out_dim",
             "head dimensions must be positive")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            need(getattr(self, name) > 0, name, "temperatures must be > 0")
        for name in ("center_momentum", "momentum_teacher"):
            need(0 <= getattr(self, name) <= 1, name, "a momentum must lie in [0, 1]")
        need(0 <= self.drop_path_rate < 1, "drop_path_rate", "must lie in [0, 1)")
        need(self.clip_grad >= 0, "clip_grad", "must be >= 0 (0 = no clipping)")
        need(self.koleo_weight >= 0, "koleo_weight", "must be >= 0 (0 = off)")
        need(self.koleo_weight == 0 or self.batch_size >= 2, "koleo_weight",
             "needs batch_size >= 2 per process (a nearest neighbour); set koleo_weight 0 or a larger batch")

    @property
    def use_queries(self):
        """The query branch runs only when it is weighted (Eq. 9, lambda > 0)."""
        return self.query_weight > 0

    @property
    def draws_queries(self):
        """Query crops are cut when the query branch or the local-crop baseline uses them."""
        return self.use_queries or self.query_as_local


# --------------------------------------------------------------------------------------
# Positions (Eq. 4) and query-crop geometry (Fig. 2)
# --------------------------------------------------------------------------------------


def sincos_2d(rows, cols, dim):
    """Eq. 4 at real-valued positions: rows, cols (...) -> embedding (..., dim).

    MAE layout: the first half encodes the column, the second the row; each half holds
    sin(p * w_i) for the dim/4 frequencies w_i = 1 / 10000^(i / (dim/4)), then cos(p * w_i).
    Positions may be fractional, negative or outside the view (query patches often are).
    Computed in float64 and returned as float32, so it is exact to float32 rounding.
    """
    if dim % 4 != 0:
        raise ValueError(f"embed_dim: {dim} is not divisible by 4, as the 2D sincos embedding needs; pick a multiple of 4")
    rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=rows.device) / (dim // 4))  # (dim/4,)

    def encode(p):  # (...) -> (..., dim/2)
        angles = p.to(torch.float64)[..., None] * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    return torch.cat([encode(cols), encode(rows)], dim=-1).float()


def relative_positions(global_box, query_box, global_grid, query_grid, global_flip=False, query_flip=False):
    """(row, col) of each query patch's top-left corner in the global view's patch grid.

    Boxes are (top, left, height, width) in source-image pixels, as
    RandomResizedCrop.get_params returns them; each view is that box resized to a
    grid x grid patch grid, then (optionally) flipped horizontally. Returns
    (query_grid, query_grid, 2); entry [a, b] is the patch at row a, column b of the
    query view as the teacher sees it (after its flip). The integer grid of the
    global view itself is positions (i, j), so a query crop equal to the global view
    gets exactly the global grid.
    """
    g_top, g_left, g_h, g_w = (float(v) for v in global_box)
    q_top, q_left, q_h, q_w = (float(v) for v in query_box)
    idx = torch.arange(query_grid, dtype=torch.float64)  # (l,)
    # one query patch in global patch units; exactly 1.0 when the query crop is the global view
    step_h = q_h * global_grid / (query_grid * g_h)
    step_w = q_w * global_grid / (query_grid * g_w)
    rows = (q_top - g_top) * global_grid / g_h + idx * step_h  # (l,) row a
    src_col = idx.flip(0) if query_flip else idx  # displayed column b shows source column l-1-b
    # into global patch units: the column range [u0, u1) of each patch, u1 = u0 + step_w
    u0 = (q_left - g_left) * global_grid / g_w + src_col * step_w  # (l,)
    u1 = u0 + step_w
    cols = global_grid - u1 if global_flip else u0  # a flip maps [u0, u1) to (G - u1, G - u0]
    return torch.stack(torch.broadcast_tensors(rows[:, None], cols[None, :]), dim=-1).float()  # (l, l, 2)


# --------------------------------------------------------------------------------------
# Block-wise masks (iBOT / BEiT): True = masked
# --------------------------------------------------------------------------------------


def _uniform(lo, hi, generator):
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def sample_mask_ratio(ratios=(0.0, 0.3), ratio_vars=(0.0, 0.2), generator=None):
    """iBOT's per-view masking ratio: pick one of `ratios`, jitter it by +- its var."""
    pick = torch.randint(len(ratios), (), generator=generator).item()
    ratio, var = ratios[pick], ratio_vars[pick]
    return _uniform(ratio - var, ratio + var, generator) if var > 0 else ratio


def block_mask(rows, cols, ratio, generator=None, aspect=(0.3, 1 / 0.3)):
    """BEiT block-wise mask (rows, cols) bool with at most ratio * rows * cols True.

    Rectangles with aspect in `aspect` and area >= (min(rows, cols) // 3)^2 are added until
    the budget is reached or ten placements in a row fail to add patches; once less than
    that area is left, the last blocks are drawn between the two (as BEiT and iBOT do).
    """
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    budget_total = ratio * rows * cols
    min_area = (min(rows, cols) // 3) ** 2
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    masked = 0
    while masked < budget_total:
        budget = budget_total - masked
        added = 0
        for _ in range(10):
            area = _uniform(min_area, budget, generator)
            ratio_hw = math.exp(_uniform(*log_aspect, generator))
            h, w = round(math.sqrt(area * ratio_hw)), round(math.sqrt(area / ratio_hw))
            if h < rows and w < cols:
                top = torch.randint(rows - h + 1, (), generator=generator).item()
                left = torch.randint(cols - w + 1, (), generator=generator).item()
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    added = new
                    break
        if added == 0:
            break
        masked += added
    return mask


# --------------------------------------------------------------------------------------
# Views: two global views (BYOL/DINO recipe) and Q query crops with their positions
# --------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PQCLAugmentation:
    """PIL image (or uint8 tensor (3, H, W)) -> dict of one sample's views.

    globals    (V, 3, S, S)   view 1: blur p=1.0; view 2: blur p=0.1, solarize p=0.2 (BYOL)
    queries    (Q, 3, s, s)   DINO's local-crop recipe (flip, colour, blur p=0.5)
    locals     (N, 3, s', s') multi-crop local views, the same recipe (student only)
    query_pos  (V, Q, L, 2)   relative_positions of each query crop in each global view, row-major
    masks      (V, G, G)      iBOT block masks for the student's global views (all False if unused)
    global_boxes (V, 4), query_boxes (Q, 4), local_boxes (N, 4), global_flips (V,), query_flips (Q,),
    local_flips (N,): the geometry used
    Randomness comes from torch's global generator (seed it per sample for reproducible data).
    `blur` is the Gaussian blur's class: T.GaussianBlur or a faster one with its interface;
    `draw_box` and `crop` are the geometry, which a subclass may take from other image types.
    """

    def __init__(self, global_size=224, query_size=96, patch_size=16, num_queries=1,
                 global_scale=(0.25, 1.0), query_scale=(0.05, 0.25), mask_ratios=(0.0, 0.3),
                 mask_ratio_vars=(0.0, 0.2), mask_aspect=(0.3, 1 / 0.3), num_locals=0, local_size=96,
                 local_scale=(0.05, 0.4), mean=IMAGENET_MEAN, std=IMAGENET_STD, blur=T.GaussianBlur):
        if global_size % patch_size or query_size % patch_size or (num_locals and local_size % patch_size):
            raise ValueError(f"img_size/query_size/local_crops_size: {global_size}/{query_size}/{local_size} must be "
                             f"multiples of patch_size {patch_size}")
        if num_queries < 0:
            raise ValueError("num_queries: must be >= 0")
        self.global_size, self.query_size, self.patch_size = global_size, query_size, patch_size
        self.num_queries, self.global_scale, self.query_scale = num_queries, global_scale, query_scale
        self.mask_ratios, self.mask_ratio_vars, self.mask_aspect = mask_ratios, mask_ratio_vars, mask_aspect
        self.num_locals, self.local_size, self.local_scale = num_locals, local_size, local_scale
        colour = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]

        def random_blur(size, p):  # BYOL: kernel 10% of the side, sigma 0.1-2.0 px at 224 px, scaled with the side
            return T.RandomApply([blur(2 * round(0.05 * size) + 1, (0.1 * size / 224, 2.0 * size / 224))],
                                 p=p)

        finish = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
        self.global_pixels = [
            T.Compose([*colour, random_blur(global_size, 1.0), *finish]),
            T.Compose([*colour, random_blur(global_size, 0.1), T.RandomSolarize(128, p=0.2), *finish]),
        ]
        self.query_pixels = T.Compose([*colour, random_blur(query_size, 0.5), *finish])
        self.local_pixels = T.Compose([*colour, random_blur(local_size, 0.5), *finish])

    @classmethod
    def from_config(cls, cfg, **kwargs):
        return cls(cfg.img_size, cfg.query_size, cfg.patch_size, cfg.num_queries if cfg.draws_queries else 0,
                   cfg.global_scale, cfg.query_scale,
                   cfg.mask_ratios if cfg.framework == "ibot" else (0.0,),
                   cfg.mask_ratio_vars if cfg.framework == "ibot" else (0.0,), cfg.mask_aspect,
                   cfg.local_crops_number, cfg.local_crops_size, cfg.local_crops_scale, **kwargs)

    @staticmethod
    def crop(image, box, size, flip):
        """The geometry of every view: crop `box`, resize to size x size (bicubic), then flip."""
        view = TF.resized_crop(image, *box, [size, size], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        return TF.hflip(view) if flip else view

    @staticmethod
    def draw_box(image, scale):
        """A random box (top, left, h, w) in the image's pixels: RandomResizedCrop's, aspect 3/4 to 4/3."""
        return T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3])

    def _random_view(self, image, size, scale):
        box = self.draw_box(image, scale)
        flip = bool(torch.rand(()) < 0.5)
        return self.crop(image, box, size, flip), box, flip

    def _random_views(self, image, size, scale, pipelines):
        """One random view per pixel pipeline, in turn -> (views, boxes, flips), lists."""
        views, boxes, flips = [], [], []
        for pixels in pipelines:
            view, box, flip = self._random_view(image, size, scale)
            views.append(pixels(view))
            boxes.append(box)
            flips.append(flip)
        return views, boxes, flips

    def __call__(self, image):
        # Random draws: globals, one seed for the masks, queries, locals. So every method (iBOT
        # or DINO, Q = 0 or not, N = 0 or not) sees the same global views and query crops for
        # the same seed.
        globals_, global_boxes, global_flips = self._random_views(image, self.global_size, self.global_scale,
                                                                  self.global_pixels)
        grid = self.global_size // self.patch_size
        mask_rng = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        masks = torch.stack([
            block_mask(grid, grid, sample_mask_ratio(self.mask_ratios, self.mask_ratio_vars, mask_rng), mask_rng,
                       self.mask_aspect)
            for _ in global_boxes])  # (V, G, G)
        queries, query_boxes, query_flips = self._random_views(image, self.query_size, self.query_scale,
                                                               [self.query_pixels] * self.num_queries)
        locals_, local_boxes, local_flips = self._random_views(image, self.local_size, self.local_scale,
                                                               [self.local_pixels] * self.num_locals)
        q_grid = self.query_size // self.patch_size
        query_pos = torch.zeros(len(global_boxes), self.num_queries, q_grid * q_grid, 2)  # (V, Q, L, 2)
        for v, (g_box, g_flip) in enumerate(zip(global_boxes, global_flips)):
            for q, (q_box, q_flip) in enumerate(zip(query_boxes, query_flips)):
                query_pos[v, q] = relative_positions(g_box, q_box, grid, q_grid, g_flip, q_flip).flatten(0, 1)
        return {
            "globals": torch.stack(globals_),  # (V, 3, S, S)
            "queries": torch.stack(queries) if queries else torch.zeros(0, 3, self.query_size, self.query_size),
            "locals": torch.stack(locals_) if locals_ else torch.zeros(0, 3, self.local_size, self.local_size),
            "query_pos": query_pos,
            "masks": masks,
            "global_boxes": torch.tensor(global_boxes, dtype=torch.long).view(-1, 4),
            "query_boxes": torch.tensor(query_boxes, dtype=torch.long).view(-1, 4),
            "local_boxes": torch.tensor(local_boxes, dtype=torch.long).view(-1, 4),
            "global_flips": torch.tensor(global_flips, dtype=torch.bool),
            "query_flips": torch.tensor(query_flips, dtype=torch.bool),
            "local_flips": torch.tensor(local_flips, dtype=torch.bool),
        }


# --------------------------------------------------------------------------------------
# Vision Transformer with positional queries (Eq. 3, 5, 6); parameter names are timm's
# --------------------------------------------------------------------------------------


def drop_path(x, rate, training):
    """Stochastic depth: drop the residual branch per sample. One draw per sample of x
    (B, T, D), so query tokens share their image's draw and never change the raw tokens'."""
    if rate == 0.0 or not training:
        return x
    # a comparison, not bernoulli_(1 - rate): torch.compile keeps the rate a graph input
    # then, so the blocks (each with its own rate) share one compiled graph
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= rate  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1.0 - rate)


def matmul_attention(q, k, v):
    """softmax(q k^T / sqrt(hd)) v as two batched matmuls: what F.scaled_dot_product_attention
    computes, without its fused kernels. q (..., Tq, hd), k and v (..., Tk, hd) -> (..., Tq, hd).
    Written out because at the few dozen tokens of the CPU presets torch's CPU kernels are the
    slower: under bf16 autocast its flash kernel took 5.7x, in fp32 2.6x the time of these two
    bf16 matmuls (forward and backward at 65 tokens, Zen 4 EPYC), and its math backend computes
    bf16 in fp32. train_ddp times both at start (cpu_attention)."""
    weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (..., Tq, Tk)
    return weights.softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attend = F.scaled_dot_product_attention  # (q, k, v) -> out; train_ddp may set matmul_attention

    def forward(self, x, num_raw, num_crops):
        """x (B, R + Q*L, D): R raw tokens, then the L query tokens of each of Q crops.

        Raw tokens attend only to raw tokens (plain ViT self-attention). The query
        tokens of a crop attend to the raw tokens and to their own crop (Eq. 6), so
        they read the image through attention but never write into it.
        """
        B, T, D = x.shape
        H, R = self.num_heads, num_raw
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        out = self.attend(q[:, :, :R], k[:, :, :R], v[:, :, :R])  # (B, H, R, hd)
        if num_crops == 1:  # the crop's keys, raw tokens then its own, are the whole sequence: no copy
            crop_out = self.attend(q[:, :, R:], k, v)  # Eq. 6, (B, H, L, hd)
            out = torch.cat([out, crop_out], dim=2)  # (B, H, T, hd)
        elif num_crops > 1:
            L = (T - R) // num_crops

            def per_crop(t):  # (B, H, T, hd) -> (B*Q, H, R + L, hd): raw tokens, then the crop's own
                raw = t[:, None, :, :R].expand(-1, num_crops, -1, -1, -1)  # (B, Q, H, R, hd)
                own = t[:, :, R:].unflatten(2, (num_crops, L)).transpose(1, 2)  # (B, Q, H, L, hd)
                return torch.cat([raw, own], dim=3).flatten(0, 1)

            crop_q = q[:, :, R:].unflatten(2, (num_crops, L)).transpose(1, 2).flatten(0, 1)  # (B*Q, H, L, hd)
            crop_out = self.attend(crop_q, per_crop(k), per_crop(v))  # Eq. 6, (B*Q, H, L, hd)
            crop_out = crop_out.unflatten(0, (B, num_crops)).transpose(1, 2).flatten(2, 3)  # (B, H, Q*L, hd)
            out = torch.cat([out, crop_out], dim=2)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x, num_raw, num_crops=0):  # (B, T, D) -> (B, T, D)
        x = x + drop_path(self.attn(self.norm1(x), num_raw, num_crops), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):  # (B, 3, h, w) -> (B, h/P * w/P, D), row-major
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """A plain ViT (timm parameter names) plus one `mask_token`; fixed sincos positions."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"embed_dim: {embed_dim} is not divisible by 4, as the 2D sincos embedding needs; pick a multiple of 4")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: embed_dim {embed_dim} is not divisible by {num_heads} heads; pick a divisor")
        if img_size % patch_size:
            raise ValueError(f"img_size: {img_size} is not a multiple of patch_size {patch_size}; pick a multiple")
        self.patch_size, self.embed_dim = patch_size, embed_dim
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        table = sincos_2d(rows.flatten(), cols.flatten(), embed_dim)  # (N, D), Eq. 4 on the integer grid
        table = torch.cat([torch.zeros(1, embed_dim), table])  # the [CLS] slot holds zeros
        self.pos_embed = nn.Parameter(table[None], requires_grad=False)  # (1, 1+N, D), fixed
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # m of Eq. 5 (iBOT's masked_embed)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear)
        self.register_load_state_dict_pre_hook(self._keep_own_mask_token)

    def _keep_own_mask_token(self, module, state_dict, prefix, *args):
        """A backbone exported for timm has no mask token (it only serves pretraining):
        loading one strictly keeps this model's own."""
        state_dict.setdefault(prefix + "mask_token", self.mask_token.detach().clone())

    def pos_embed_for(self, rows, cols):
        """(1, 1 + rows*cols, D): the table, bicubically resized for another grid (DINO)."""
        grid = math.isqrt(self.pos_embed.shape[1] - 1)
        if (rows, cols) == (grid, grid):
            return self.pos_embed
        table = self.pos_embed[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
        table = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], table.flatten(2).transpose(1, 2)], dim=1)

    def embed(self, images, mask=None):
        """images (B, 3, h, w), mask (B, h/P, w/P) bool or None -> tokens (B, R, D), Eq. 1 / 3."""
        B, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"images: {h}x{w} is not a multiple of patch_size {self.patch_size}; resize or crop")
        x = self.patch_embed(images)  # (B, N, D)
        if mask is not None:  # iBOT: masked patches become the mask token before positions are added
            x = torch.where(mask.flatten(1)[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, R, D)
        return x + self.pos_embed_for(h // self.patch_size, w // self.patch_size)

    def forward(self, images):
        """Teacher / downstream: images (B, 3, h, w) -> all tokens after the final norm (B, R, D)."""
        return self.get_intermediate_layers(images, 1)[0]

    def get_intermediate_layers(self, images, n=1):
        """DINO's hook for its linear probe: images (B, 3, h, w) -> the tokens after each of the
        last n blocks, each through the final norm: a list of n tensors (B, R, D), deepest last."""
        x = self.embed(images)
        layers = []
        for i, block in enumerate(self.blocks):
            x = block(x, x.shape[1])
            if i >= len(self.blocks) - n:
                layers.append(self.norm(x))
        return layers

    def forward_student(self, images, query_pos=None, mask=None):
        """Student: images (B, 3, S, S), query_pos (B, Q, L, 2) or None, mask (B, G, G) or None
        -> tokens (B, R, D), query_tokens (B, Q, L, D)."""
        x = self.embed(images, mask)  # (B, R, D)
        B, R, D = x.shape
        if query_pos is None:
            query_pos = x.new_zeros(B, 0, 0, 2)
        _, num_crops, L, _ = query_pos.shape
        queries = self.mask_token + sincos_2d(query_pos[..., 0], query_pos[..., 1], D).to(x.dtype)  # Eq. 5, (B, Q, L, D)
        x = torch.cat([x, queries.flatten(1, 2)], dim=1)  # Eq. 3, (B, R + Q*L, D)
        for block in self.blocks:
            x = block(x, R, num_crops)
        x = self.norm(x)
        return x[:, :R], x[:, R:].unflatten(1, (num_crops, L))


def _init_linear(module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_backbone(arch, depth=0, **kwargs):
    """A preset by name; depth 0 keeps the preset's number of blocks."""
    if arch not in ARCHS:
        raise ValueError(f"arch: unknown architecture {arch!r}; use one of {sorted(ARCHS)}")
    embed_dim, preset_depth, num_heads = ARCHS[arch]
    return VisionTransformer(embed_dim=embed_dim, depth=depth or preset_depth, num_heads=num_heads, **kwargs)


def vit_tiny(patch_size=16, **kwargs):
    return build_backbone("vit_tiny", patch_size=patch_size, **kwargs)


def vit_small(patch_size=16, **kwargs):
    return build_backbone("vit_small", patch_size=patch_size, **kwargs)


def vit_base(patch_size=16, **kwargs):
    return build_backbone("vit_base", patch_size=patch_size, **kwargs)


def vit_large(patch_size=16, **kwargs):
    return build_backbone("vit_large", patch_size=patch_size, **kwargs)


# --------------------------------------------------------------------------------------
# Projection heads g (DINO / iBOT) and head sharing (Table 7)
# --------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """3-layer MLP (GELU) -> l2-normalised bottleneck -> weight-normalised linear to K prototypes."""

    def __init__(self, in_dim, out_dim=8192, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=False):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim))
        self.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0  # (K, 1), the weight-norm g
        gain.data.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, x):  # (..., D) -> (..., K)
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def head_names(cfg, teacher):
    """Which heads a branch holds. A shared head is stored under 'cls' and serves every
    token type; 'semi-shared' gives the student one head per type and the teacher one."""
    types = ["cls"] + (["patch"] if cfg.framework == "ibot" else []) + (["query"] if cfg.use_queries else [])
    if cfg.head_mode == "shared" or (cfg.head_mode == "semi-shared" and teacher):
        return ["cls"]
    return types


def apply_heads(heads, inputs):
    """Run each head once on all token types it serves: {type: (..., D)} -> {type: (..., K)}.
    Heads act on each token alone, so batching token types together changes nothing."""
    groups = {}
    for kind, x in inputs.items():
        name = kind if kind in heads else "cls"
        groups.setdefault(name, []).append(kind)
    out = {}
    for name, kinds in groups.items():
        flat = [inputs[k].flatten(0, -2) for k in kinds]
        logits = heads[name](torch.cat(flat)).split([f.shape[0] for f in flat])
        out.update({k: y.unflatten(0, inputs[k].shape[:-1]) for k, y in zip(kinds, logits)})
    return out


# --------------------------------------------------------------------------------------
# Losses (Eq. 2, 8, 9): pure functions of logits
# --------------------------------------------------------------------------------------


def teacher_probs(teacher_logits, center, teacher_temp):
    """sg(g'(f'(x))): centered, sharpened teacher distribution (..., K)."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


def cross_entropy(student_logits, targets, student_temp):
    """H(t, s) = -sum_k t_k log softmax(s / tau_s)_k over the last dim: (..., K) -> (...)."""
    return -(targets * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)


def pair_cross_entropies(student_cls, teacher_cls_probs, student_temp):
    """H(t_v, s_w) of every teacher view v and student view w, averaged over the batch.
    student_cls (W, B, K), teacher_cls_probs (V, B, K) -> (V, W); the student's first V
    views are the teacher's V global views."""
    log_p = F.log_softmax(student_cls.float() / student_temp, dim=-1)  # (W, B, K)
    return -torch.einsum("tbk,sbk->ts", teacher_cls_probs, log_p) / log_p.shape[1]  # (V_teacher, W_student)


def cls_loss(student_cls, teacher_cls_probs, student_temp):
    """Eq. 2, [CLS] terms: each student view's [CLS] predicts every *other* global view's
    teacher [CLS]; with N local crops (multi-crop) every pair of different views counts
    once, as in DINO. student_cls (V + N, B, K): the V global views, then the local crops;
    teacher_cls_probs (V, B, K) -> mean over the V(V + N - 1) pairs and the batch."""
    pair = pair_cross_entropies(student_cls, teacher_cls_probs, student_temp)  # (V, V + N)
    V, W = pair.shape
    return (pair.sum() - pair.diagonal().sum()) / (V * (W - 1))  # mean off the diagonal, without a host sync


def mean_per_image(per_token, image_index, num_images):
    """Values of the M masked tokens (M,), image_index (M,) the view-image each came from ->
    the mean over each image's masked tokens, then over all num_images view-images
    (an image without masked tokens counts as 0), as iBOT averages its patch term."""
    per_image = per_token.new_zeros(num_images).index_add_(0, image_index, per_token)  # (V*B,)
    # counted by index_add_, not bincount: on a GPU bincount waits for the device to size its output
    count = torch.zeros_like(per_image).index_add_(0, image_index, torch.ones_like(per_token)).clamp(min=1)
    return (per_image / count).mean()


def patch_loss(student_masked, teacher_masked_probs, image_index, num_images, student_temp):
    """Eq. 2, masked-patch terms (iBOT): within a view, each masked student token predicts
    the teacher token at the same place. student_masked, teacher_masked_probs (M, K) for the
    M masked tokens, image_index (M,) the view-image each came from."""
    return mean_per_image(cross_entropy(student_masked, teacher_masked_probs, student_temp), image_index, num_images)


def query_loss(student_query, teacher_query_probs, student_temp):
    """Eq. 8: the student's query tokens, computed inside each global view, predict the
    teacher's tokens of the query crop seen with pixels. student_query (V, B, Q, L, K),
    teacher_query_probs (B, Q, L, K) -> mean over views, images, crops and patches."""
    return cross_entropy(student_query, teacher_query_probs[None], student_temp).mean()


def koleo_loss(cls_tokens):
    """DINOv2's KoLeo regulariser (Sablayrolles et al., 2019), not part of PQCL: within each
    view, minus the mean log distance of every l2-normalised [CLS] token to its nearest
    other token of the batch, which spreads the batch over the sphere. cls_tokens (V, B, D)
    -> sum over the V views, as DINOv2 sums over its two global views (each process on its
    own batch, as there)."""
    x = F.normalize(cls_tokens.float(), dim=-1)  # (V, B, D)
    with torch.no_grad():
        similarity = x @ x.transpose(1, 2)  # (V, B, B)
        similarity.diagonal(dim1=1, dim2=2).fill_(-2.0)  # never one's own neighbour
        nearest = similarity.argmax(-1)  # (V, B)
    neighbours = x.gather(1, nearest[..., None].expand_as(x))  # (V, B, D)
    return -torch.log((x - neighbours).norm(dim=-1) + 1e-8).mean(-1).sum()


# Reading a run (DINO Sec. 5.3): cross-entropy = H(t) + KL(t || s). H(t) near ln K with KL
# near 0 is collapse to a uniform output, H(t) near 0 with KL near 0 collapse to one
# prototype; an effective rank near 1 is dimensional collapse.

def entropy(probs):
    """H(p) in nats over the last dim: (..., K) -> (...); 0 log 0 = 0."""
    return torch.special.entr(probs).sum(-1)


def effective_rank(embeddings):
    """RankMe (Garrido et al., 2023): exp of the entropy of the singular values of a batch of
    embeddings (n, D), normalised to sum 1; between 1 and min(n, D)."""
    singular_values = torch.linalg.svdvals(embeddings.float())  # (min(n, D),)
    return entropy(singular_values / singular_values.sum()).exp()


# --------------------------------------------------------------------------------------
# PQCL: student, EMA teacher, heads, centers
# --------------------------------------------------------------------------------------


class PQCL(nn.Module):
    """forward(batch) -> dict(loss, cls, patch, query). batch, as collated from
    PQCLAugmentation: globals (B, V, 3, S, S), queries (B, Q, 3, s, s),
    query_pos (B, V, Q, L, 2), masks (B, V, G, G), and with local crops locals (B, N, 3, s', s')."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        dim = ARCHS[cfg.arch][0]

        def branch(drop_path_rate, teacher):
            backbone = build_backbone(cfg.arch, cfg.depth, img_size=cfg.img_size, patch_size=cfg.patch_size,
                                      drop_path_rate=drop_path_rate)
            heads = nn.ModuleDict({name: ProjectionHead(dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                                                        cfg.norm_last_layer)
                                   for name in head_names(cfg, teacher)})
            return nn.ModuleDict({"backbone": backbone, "heads": heads})

        self.student = branch(cfg.drop_path_rate, teacher=False)
        self.teacher = branch(0.0, teacher=True)
        # the mask token is only used by masking (iBOT) and by query tokens; frozen
        # otherwise so that no parameter is left without a gradient (plain DDP works)
        self.student.backbone.mask_token.requires_grad = cfg.framework == "ibot" or cfg.use_queries
        teacher_names = set(self.teacher.state_dict())  # semi-shared: the teacher has fewer heads
        self.teacher.load_state_dict({k: v for k, v in self.student.state_dict().items() if k in teacher_names})
        self.teacher.requires_grad_(False)
        # three centers (Eq. 2 [CLS], Eq. 2 patches, Eq. 8 queries), one per teacher output type
        for name in ("center_cls", "center_patch", "center_query"):
            self.register_buffer(name, torch.zeros(cfg.out_dim))

    def forward(self, batch, teacher_temp=None, monitor=False):
        """-> {loss, cls, patch, query}; with `monitor`, also the collapse monitors (entropy_T,
        kl_T for each term T, in nats) and the teacher's [CLS] tokens (V*B, D) for the rank."""
        cfg = self.cfg
        teacher_temp = cfg.teacher_temp if teacher_temp is None else teacher_temp
        images = batch["globals"].transpose(0, 1).flatten(0, 1)  # (V*B, 3, S, S), view-major
        V, B = batch["globals"].shape[1], batch["globals"].shape[0]
        masks = batch["masks"].transpose(0, 1).flatten(0, 1).flatten(1) if cfg.framework == "ibot" else None  # (V*B, N)
        query_pos = batch["query_pos"].transpose(0, 1).flatten(0, 1) if cfg.use_queries else None  # (V*B, Q, L, 2)
        # student-only views with pixels: multi-crop local crops, and the query crops for the baseline
        local_views = [crops.transpose(0, 1).flatten(0, 1) for crops, used in  # (N*B, 3, s', s'), view-major
                       ((batch.get("locals"), cfg.local_crops_number > 0), (batch["queries"], cfg.query_as_local))
                       if used]

        # (image, patch) indices of the M masked patches, (M,) each: the step's one host sync (M varies)
        masked = masks.nonzero(as_tuple=True) if masks is not None else None
        targets, teacher_cls_tokens = self.teacher_targets(images, masked, batch["queries"] if query_pos is not None
                                                           else None, teacher_temp)

        tokens, query_tokens = self.student.backbone.forward_student(images, query_pos, masks)
        # The head maps each token on its own, so running it only on the tokens that enter
        # the loss ([CLS], masked patches, query tokens) gives exactly the same loss and
        # gradients as running it on every token and then selecting.
        inputs = {"cls": tokens[:, 0]}
        if masked is not None:
            inputs["patch"] = tokens[:, 1:][masked]  # (M, D)
        if query_pos is not None:
            inputs["query"] = query_tokens  # (V*B, Q, L, D)
        if local_views:
            inputs["local"] = torch.cat([self.student.backbone(views)[:, 0] for views in local_views])  # (N*B, D)
        student_logits = apply_heads(self.student.heads, inputs)

        student_cls = student_logits["cls"].unflatten(0, (V, B))  # (V, B, K)
        if local_views:
            student_cls = torch.cat([student_cls, student_logits["local"].unflatten(0, (-1, B))])  # (V + N, B, K)
        terms = {"cls": cls_loss(student_cls, targets["cls"].unflatten(0, (V, B)), cfg.student_temp)}
        zero = terms["cls"].new_zeros(())
        terms["patch"] = zero
        if masked is not None:
            terms["patch"] = patch_loss(student_logits["patch"], targets["patch"], masked[0], V * B, cfg.student_temp)
        terms["query"] = zero
        if query_pos is not None:
            terms["query"] = query_loss(student_logits["query"].unflatten(0, (V, B)), targets["query"],
                                        cfg.student_temp)
        terms["koleo"] = koleo_loss(tokens[:, 0].unflatten(0, (V, B))) if cfg.koleo_weight > 0 else zero
        loss = terms["cls"] + cfg.patch_weight * terms["patch"] + cfg.query_weight * terms["query"]  # Eq. 9
        loss = loss + cfg.koleo_weight * terms["koleo"]
        out = {"loss": loss, **terms}
        if monitor:
            out.update(self.collapse_monitors(terms, targets, student_cls, masked, V),
                       teacher_cls_tokens=teacher_cls_tokens)
        return out

    @torch.no_grad()
    def collapse_monitors(self, terms, targets, student_cls, masked, V):
        """For each term, the mean entropy H(t) of its teacher targets, averaged as the term
        averages its cross-entropies, and KL(t || s) = cross-entropy - H(t). student_cls
        (V + N, B, K); the local crops' targets are the global views' [CLS] targets.
        -> {entropy_T, kl_T} scalar tensors, T in cls, patch, query, local (those present)."""
        entropies = {"cls": entropy(targets["cls"]).mean()}  # each teacher view is in V + N - 1 pairs
        cross_entropies = dict(terms)
        if "patch" in targets:
            entropies["patch"] = mean_per_image(entropy(targets["patch"]), masked[0], V * student_cls.shape[1])
        if "query" in targets:
            entropies["query"] = entropy(targets["query"]).mean()
        if len(student_cls) > V:  # the local crops' own pairs, within the [CLS] term
            pair = pair_cross_entropies(student_cls, targets["cls"].unflatten(0, (V, -1)), self.cfg.student_temp)
            cross_entropies["local"], entropies["local"] = pair[:, V:].mean(), entropies["cls"]
        monitors = {}
        for term, h in entropies.items():
            monitors[f"entropy_{term}"], monitors[f"kl_{term}"] = h, cross_entropies[term] - h
        return monitors

    @torch.no_grad()
    def teacher_targets(self, images, masked, queries, teacher_temp):
        """Eq. 7: the teacher, a plain ViT, on every global view and query crop with pixels;
        its logits centered and sharpened into targets. images (V*B, 3, S, S); masked, the
        (image, patch) indices of the M masked patches, or None; queries (B, Q, 3, s, s) or None
        -> ({cls (V*B, K), patch (M, K), query (B, Q, L, K)}, the [CLS] tokens (V*B, D)). The
        centers then move toward this batch, and the (V*B, N, K) patch logits are freed before
        the student's activations grow."""
        tokens = self.teacher.backbone(images)  # (V*B, R, D)
        inputs = {"cls": tokens[:, 0]}
        if masked is not None:
            inputs["patch"] = tokens[:, 1:]  # all patches: the center averages them all (iBOT)
        if queries is not None:  # each crop with its own [CLS] and positions
            inputs["query"] = self.teacher.backbone(queries.flatten(0, 1))[:, 1:].unflatten(0, queries.shape[:2])
        logits = apply_heads(self.teacher.heads, inputs)  # (V*B, K), (V*B, N, K), (B, Q, L, K)
        selected = {**logits, "patch": logits["patch"][masked]} if masked is not None else logits  # patch: (M, K)
        targets = {kind: teacher_probs(x, getattr(self, f"center_{kind}"), teacher_temp) for kind, x in selected.items()}
        self.update_centers(logits)  # after the targets, which use the centers as they were
        return targets, tokens[:, 0]

    @torch.no_grad()
    def update_centers(self, teacher_logits):
        """center <- m * center + (1 - m) * mean teacher logits, one center per term; the
        mean is over all ranks when torch.distributed is initialised (a no-op otherwise)."""
        kinds = list(teacher_logits)
        means = torch.stack([teacher_logits[k].float().flatten(0, -2).mean(0) for k in kinds])  # (terms, K)
        if dist.is_available() and dist.is_initialized():  # every rank holds as many tokens of each kind
            dist.all_reduce(means)
            means /= dist.get_world_size()
        for kind, mean in zip(kinds, means):
            center = getattr(self, f"center_{kind}")
            center.mul_(self.cfg.center_momentum).add_(mean, alpha=1 - self.cfg.center_momentum)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """EMA: teacher <- momentum * teacher + (1 - momentum) * student, matched by name."""
        teacher = dict(self.teacher.named_parameters())
        pairs = [(teacher[name], p) for name, p in self.student.named_parameters() if name in teacher]
        teacher_params, student_params = zip(*pairs)
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


# --------------------------------------------------------------------------------------
# Schedules: pure functions of the step
# --------------------------------------------------------------------------------------


def cosine_schedule(step, total_steps, base, final, warmup_steps=0, warmup_start=0.0):
    """Linear warm-up from warmup_start to base, then cosine from base to final at total_steps."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


def learning_rate(cfg, step, steps_per_epoch, world_size=1):
    peak = cfg.lr * cfg.batch_size * world_size / 256  # linear scaling rule
    return cosine_schedule(step, cfg.epochs * steps_per_epoch, peak, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch)


def weight_decay(cfg, step, steps_per_epoch):
    return cosine_schedule(step, cfg.epochs * steps_per_epoch, cfg.weight_decay, cfg.weight_decay_end)


def teacher_momentum(cfg, step, steps_per_epoch):
    return cosine_schedule(step, cfg.epochs * steps_per_epoch, cfg.momentum_teacher, 1.0)


def teacher_temperature(cfg, step, steps_per_epoch):
    """Linear warm-up of the teacher temperature, then constant."""
    warmup = cfg.warmup_teacher_temp_epochs * steps_per_epoch
    if step >= warmup:
        return cfg.teacher_temp
    return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup
