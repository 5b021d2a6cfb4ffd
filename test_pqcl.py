"""Invariants of pqcl.py, each checked against an independent reference.

References are written here: a plain-softmax ViT with an explicit attention mask,
a numpy evaluation of Eq. 4, a pixel oracle for query-crop geometry (a coordinate
image pushed through the augmentation's own crop), hand-computed cross-entropies,
parameter counts by formula, timm's parameter names; then the picture and bench.py's naive
reference. The machinery around the method has its own files: test_train.py (training, data,
checkpoints) and test_evaluate.py (the probes, the comparison). Models are tiny (D 32, depth 2, patch 4, 16 px images) so that the suite runs in minutes on 2 CPU cores.

    python -m pytest test_pqcl.py -q --durations=10
"""
import copy
import dataclasses
import itertools
import json
import math
import re
import statistics
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.utils.flop_counter
import torchvision.transforms.v2 as T
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import bench
import data
import pqcl
import train_ddp
import visualize

# --------------------------------------------------------------------------------------
# Shared helpers: tiny models, configs, batches and the references
# --------------------------------------------------------------------------------------

PATCH, IMG, QUERY = 4, 16, 8  # P; S = 16 -> G = 4, N = 16; s = 8 -> l = 2, L = 4
DIM, DEPTH, HEADS = 32, 2, 4
GRID = IMG // PATCH
BATCH = 2
TINY_ARCH = {"vit_test": (DIM, DEPTH, HEADS)}  # registered only while a PQCL is built
TINY_CONFIG = dict(arch="vit_test", patch_size=PATCH, img_size=IMG, query_size=QUERY, out_dim=64,
                   hidden_dim=32, bottleneck_dim=16, drop_path_rate=0.1)
FAST = settings(max_examples=40, deadline=None)  # hypothesis budget of the backbone tests


def randomize_(module, std=0.3, seed=0):
    """Give every trainable parameter random values (zero biases, unit LayerNorms and a
    zero mask token would hide mistakes), leaving the fixed pos_embed alone."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
    return module


def tiny_vit(drop_path_rate=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    model = pqcl.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH,
                                   num_heads=HEADS, drop_path_rate=drop_path_rate)
    return randomize_(model).to(dtype)


VIT = tiny_vit(drop_path_rate=0.3)  # shared by the read-only backbone tests; each sets its mode
IMAGES = torch.randn(BATCH, 3, IMG, IMG, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def tiny_config(**overrides):
    with mock.patch.dict(pqcl.ARCHS, TINY_ARCH):
        return pqcl.Config(**{**TINY_CONFIG, **overrides})


def tiny_pqcl(**overrides):
    cfg = tiny_config(**overrides)
    with mock.patch.dict(pqcl.ARCHS, TINY_ARCH):
        torch.manual_seed(0)
        return pqcl.PQCL(cfg)


def tiny_batch(cfg, seed=0):
    """A collated batch as PQCL.forward documents it; image 0's first view is unmasked."""
    gen = torch.Generator().manual_seed(seed)
    grid, q_grid, Q = cfg.img_size // cfg.patch_size, cfg.query_size // cfg.patch_size, cfg.num_queries
    masks = torch.rand(BATCH, 2, grid, grid, generator=gen) < 0.4
    masks[0, 0] = False
    return {"globals": torch.randn(BATCH, 2, 3, cfg.img_size, cfg.img_size, generator=gen),
            "queries": torch.randn(BATCH, Q, 3, cfg.query_size, cfg.query_size, generator=gen),
            "query_pos": torch.rand(BATCH, 2, Q, q_grid * q_grid, 2, generator=gen) * (grid + 2) - 1,
            "masks": masks}


def loss_terms(model, batch):
    """PQCL forward in eval mode without grad, leaving the centers as they were."""
    centers = {name: b.clone() for name, b in model.named_buffers()}
    model.eval()
    with torch.no_grad():
        out = model(batch)
    for name, b in model.named_buffers():
        b.copy_(centers[name])
    return out


def eq4_numpy(rows, cols, dim):
    """Eq. 4 channel by channel (MAE layout): channel c encodes the column if c < dim/2, else
    the row; within a half, the first dim/4 are sin, the rest cos, of p / 10000^(i / (dim/4))."""
    rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
    quarter, channel = dim // 4, np.arange(dim)
    within_half = channel % (dim // 2)
    freq_index = within_half % quarter
    p = np.where(channel >= dim // 2, rows[..., None], cols[..., None])
    angle = p / 10000.0 ** (freq_index / quarter)
    return np.where(within_half >= quarter, np.cos(angle), np.sin(angle))


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def allowed_attention(num_raw, num_crops, crop_len):
    """(T, T) bool, T = R + Q*L: raw -> raw only; crop tokens -> raw and their own crop."""
    T = num_raw + num_crops * crop_len
    allowed = torch.zeros(T, T, dtype=torch.bool)
    allowed[:num_raw, :num_raw] = True
    for c in range(num_crops):
        own = slice(num_raw + c * crop_len, num_raw + (c + 1) * crop_len)
        allowed[own, :num_raw] = True
        allowed[own, own] = True
    return allowed


def reference_student(model, images, query_pos, mask):
    """A ViT forward written from scratch with the model's weights: explicit patch matmul,
    one plain masked softmax attention over [raw; queries], hand-written LayerNorm and GELU."""
    B, D, P = images.shape[0], model.embed_dim, model.patch_size
    patches = images.unfold(2, P, P).unfold(3, P, P)  # (B, 3, G, G, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, N, 3*P*P), row-major
    x = patches @ model.patch_embed.proj.weight.flatten(1).T + model.patch_embed.proj.bias  # (B, N, D)
    if mask is not None:
        x = torch.where(mask.flatten(1)[..., None], model.mask_token[0], x)
    x = torch.cat([model.cls_token.expand(B, 1, D), x], dim=1) + model.pos_embed  # (B, R, D)
    R = x.shape[1]
    _, Q, L, _ = query_pos.shape
    pos = torch.from_numpy(eq4_numpy(query_pos[..., 0].numpy(), query_pos[..., 1].numpy(), D)).to(x.dtype)
    x = torch.cat([x, (model.mask_token + pos).flatten(1, 2)], dim=1)  # (B, R + Q*L, D)
    allowed = allowed_attention(R, Q, L)
    H = model.blocks[0].attn.num_heads
    for block in model.blocks:
        q, k, v = linear(layer_norm(x, block.norm1), block.attn.qkv).chunk(3, dim=-1)  # 3 x (B, T, D)
        q, k, v = (t.unflatten(-1, (H, D // H)).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)  # (B, H, T, T)
        x = x + linear((attn @ v).transpose(1, 2).flatten(2), block.attn.proj)
        x = x + linear(gelu(linear(layer_norm(x, block.norm2), block.mlp.fc1)), block.mlp.fc2)
    x = layer_norm(x, model.norm)
    return x[:, :R], x[:, R:].unflatten(1, (Q, L))


def student(model, query_pos, mask, train, seed=1234):
    """forward_student with drop path on in train mode; torch is reseeded so draws match."""
    model.train(train)
    torch.manual_seed(seed)
    return model.forward_student(IMAGES, query_pos, mask)


POSITION = st.floats(-2 * GRID, 3 * GRID, allow_nan=False)  # fractional, negative, out of view


@st.composite
def query_positions(draw, min_crops=0, max_crops=3):
    crops, length = draw(st.integers(min_crops, max_crops)), draw(st.integers(1, 5))
    values = draw(st.lists(POSITION, min_size=BATCH * crops * length * 2, max_size=BATCH * crops * length * 2))
    return torch.tensor(values, dtype=torch.float64).view(BATCH, crops, length, 2)


@st.composite
def patch_masks(draw):
    bits = draw(st.lists(st.booleans(), min_size=BATCH * GRID * GRID, max_size=BATCH * GRID * GRID))
    return torch.tensor(bits).view(BATCH, GRID, GRID)


MASKS = st.none() | patch_masks()

# --------------------------------------------------------------------------------------
# ViT with positional queries (Eq. 3, 5, 6)
# --------------------------------------------------------------------------------------


@FAST
@given(first=query_positions(), second=query_positions(), mask=MASKS, train=st.booleans())
def test_raw_tokens_ignore_queries(first, second, mask, train):
    """Raw and [CLS] tokens equal those of a call without queries (0 crops is the reference)."""
    raw_plain, _ = student(VIT, None, mask, train)
    raw_first, _ = student(VIT, first, mask, train)
    raw_second, _ = student(VIT, second, mask, train)
    torch.testing.assert_close(raw_first, raw_plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(raw_second, raw_plain, atol=1e-6, rtol=0)


@FAST
@given(positions=query_positions(min_crops=2), moved=st.data(), mask=MASKS, train=st.booleans())
def test_query_crops_are_independent(positions, moved, mask, train):
    """Moving crop j changes crop j's outputs and leaves every other crop's bit for bit (atol 1e-6)."""
    j = moved.draw(st.integers(0, positions.shape[1] - 1))
    shifted = positions.clone()
    shifted[:, j] += moved.draw(st.floats(0.5, 3.0))
    _, before = student(VIT, positions, mask, train)
    _, after = student(VIT, shifted, mask, train)
    others = [i for i in range(positions.shape[1]) if i != j]
    torch.testing.assert_close(after[:, others], before[:, others], atol=1e-6, rtol=0)
    assert (after[:, j] - before[:, j]).abs().max() > 1e-3


@FAST
@given(positions=query_positions(), mask=MASKS)
def test_forward_student_matches_masked_attention_reference(positions, mask):
    """Fast path = a from-scratch ViT with one (R+QL)x(R+QL) boolean attention mask (eval mode)."""
    raw, queries = student(VIT, positions, mask, train=False)
    with torch.no_grad():
        ref_raw, ref_queries = reference_student(VIT, IMAGES, positions, mask)
    # float64 throughout; the model's float32 query embedding leaves ~1e-8 (measured)
    torch.testing.assert_close(raw, ref_raw, atol=1e-6, rtol=0)
    torch.testing.assert_close(queries, ref_queries, atol=1e-6, rtol=0)


@FAST
@given(tq=st.integers(1, 9), tk=st.integers(1, 9), hd=st.sampled_from([2, 8, 64]), seed=st.integers(0, 2**16))
def test_matmul_attention_is_sdpa(tq, tk, hd, seed):
    """pqcl.matmul_attention computes what F.scaled_dot_product_attention computes (float64)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, t, hd, generator=g, dtype=torch.float64) for t in (tq, tk, tk))
    torch.testing.assert_close(pqcl.matmul_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("num_crops", [1, 2])
@pytest.mark.parametrize("attend", [F.scaled_dot_product_attention, pqcl.matmul_attention])
def test_attention_under_bf16_autocast_is_the_masked_reference(attend, num_crops):
    """Attention.attend (train_ddp sets pqcl.matmul_attention where a CPU runs it faster): every
    attention call goes through it, and under bf16 autocast the block returns bf16 equal to the
    masked softmax attention of the bf16 q, k, v computed in float64 by hand, to the rounding of
    a few bf16 steps."""
    R, L, D, H = 5, 3, 32, 2
    torch.manual_seed(0)
    attn = pqcl.Attention(D, H)
    x = torch.randn(2, R + num_crops * L, D)
    calls = []

    def recording(q, k, v):
        calls.append(q.shape)
        return attend(q, k, v)

    attn.attend = recording
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, R, num_crops)  # (2, T, D)
        q, k, v = attn.qkv(x).view(2, -1, 3, H, D // H).permute(2, 0, 3, 1, 4).double()  # 3 x (2, H, T, hd)
    assert len(calls) == 2 and out.dtype == torch.bfloat16  # raw tokens, then the crops' queries
    scores = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5
    scores = scores.masked_fill(~allowed_attention(R, num_crops, L), float("-inf"))
    mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, -1, D)  # (2, T, D), float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = attn.proj(mixed.bfloat16())
    torch.testing.assert_close(out.double(), reference.double(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("train", [False, True])
def test_forward_student_without_queries_or_mask_is_forward(train):
    """Zero crops (None or an empty (B, 0, L, 2)) and no mask: forward_student = forward."""
    VIT.train(train)
    torch.manual_seed(7)
    plain = VIT(IMAGES)
    for empty in (None, torch.zeros(BATCH, 0, 4, 2, dtype=torch.float64)):
        raw, queries = student(VIT, empty, None, train, seed=7)
        torch.testing.assert_close(raw, plain, atol=1e-6, rtol=0)
        assert queries.shape[:2] == (BATCH, 0)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_drop_path_keeps_the_expectation_with_one_draw_per_sample(rate):
    """Stochastic depth in train mode: each sample's branch is either dropped whole (zeros) or
    kept whole and scaled by exactly 1 / (1 - rate); about `rate` of the samples are dropped
    (5 sigma of a binomial), so the mean over draws is the input. Eval mode and rate 0 are
    the identity. (At rate 0.5 an inverted keep mask would look right: 0.1 and 0.3 do not.)"""
    n = 40_000
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64).expand(n, 3, 5)
    torch.manual_seed(0)
    out = pqcl.drop_path(x, rate, training=True)
    dropped = (out == 0).all(-1).all(-1)  # (n,)
    assert torch.equal(out[dropped], torch.zeros_like(out[dropped]))
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - rate), atol=0, rtol=1e-12)
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs(dropped.double().mean().item() - rate) < 5 * sigma
    torch.testing.assert_close(out.mean(0), x[0], atol=5 * sigma / (1 - rate) * x.abs().max().item(), rtol=0)
    assert pqcl.drop_path(x, rate, training=False) is x
    assert pqcl.drop_path(x, 0.0, training=True) is x


def test_drop_path_rate_rises_linearly_over_the_blocks():
    """DeiT / timm schedule: block i of d drops its branches at rate * i / (d - 1), from 0 in
    the first block to the full rate in the last (attention and MLP branch alike); PQCL's
    teacher uses rate 0 in every block. The rates are recorded as the forward passes use them."""
    used = []
    real = pqcl.drop_path

    def recording(x, rate, training):
        used.append(rate)
        return real(x, rate, training)

    depth, rate = 5, 0.4
    vit = pqcl.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=depth, num_heads=HEADS,
                                 drop_path_rate=rate).train()
    with mock.patch.object(pqcl, "drop_path", recording):
        vit(IMAGES.float())
        assert used == pytest.approx([rate * i / (depth - 1) for i in range(depth) for _ in range(2)], abs=1e-7)
        used.clear()
        model = tiny_pqcl(drop_path_rate=0.3).train()
        model.teacher.backbone(IMAGES.float())
        assert used == [0.0] * 2 * DEPTH


# --------------------------------------------------------------------------------------
# Positions (Eq. 4)
# --------------------------------------------------------------------------------------


@FAST
@given(positions=st.lists(st.tuples(POSITION, POSITION), min_size=1, max_size=8),
       dim=st.sampled_from([4, 8, 32, 384]))
def test_sincos_matches_numpy_eq4(positions, dim):
    """sincos_2d at fractional, negative and out-of-view positions = numpy Eq. 4 (MAE layout)."""
    rows, cols = torch.tensor(positions, dtype=torch.float64).unbind(-1)
    np.testing.assert_allclose(pqcl.sincos_2d(rows, cols, dim).numpy(), eq4_numpy(rows.numpy(), cols.numpy(), dim),
                               atol=1e-6, rtol=0)


def test_pos_embed_is_eq4_on_integer_grid():
    """pos_embed[0, 1:] = numpy Eq. 4 at (k // G, k % G), row-major; the [CLS] slot is zero."""
    model = pqcl.VisionTransformer(img_size=24, patch_size=4, embed_dim=DIM, depth=1, num_heads=HEADS)
    grid = 6
    k = np.arange(grid * grid)
    expected = eq4_numpy(k // grid, k % grid, DIM)
    np.testing.assert_allclose(model.pos_embed[0, 1:].detach().numpy(), expected, atol=1e-6, rtol=0)
    assert not model.pos_embed[0, 0].any()
    assert not model.pos_embed.requires_grad


# --------------------------------------------------------------------------------------
# Query-crop geometry: relative_positions against a pixel oracle
# --------------------------------------------------------------------------------------

SOURCE = 96  # side of the coordinate image (px)
ORACLE_SIZE, ORACLE_QUERY, ORACLE_PATCH = 32, 16, 4  # G = 8, l = 4
ORACLE_GRID, ORACLE_QUERY_GRID = ORACLE_SIZE // ORACLE_PATCH, ORACLE_QUERY // ORACLE_PATCH
# Bicubic resizing reproduces a linear ramp except near crop borders, where it biases the
# outermost pixels. Over global boxes of 32-96 px and query boxes of 8-48 px (3 px to 12 px
# per global patch) the largest error seen in 4000 random and extreme boxes was 0.0025 of
# a global patch; 0.01 patch leaves a 4x margin and is 1% of a patch, while a mirrored
# position is off by |G - 2 * centre|, i.e. whole patches away from the view's centre.
ORACLE_TOL = 0.01


def coordinate_image(height=SOURCE, width=SOURCE):
    """(3, H, W) float: channel 0 holds each pixel's source x + 0.5, channel 1 its y + 0.5."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)]).float()


def patch_mean_source(view, patch=ORACLE_PATCH):
    """(3, s, s) view of the coordinate image -> (l, l, 2) mean source (y, x) of each patch."""
    means = view[:2].double().unfold(1, patch, patch).unfold(2, patch, patch).mean((-1, -2))  # (2, l, l)
    return means.flip(0).permute(1, 2, 0)


def in_global_frame(source_yx, global_box, global_flip, grid=ORACLE_GRID):
    """Source (y, x) -> (row, col) in global patch units, in the global view as displayed."""
    top, left, height, width = global_box
    row = (source_yx[..., 0] - top) * grid / height
    col = (source_yx[..., 1] - left) * grid / width
    return torch.stack([row, grid - col if global_flip else col], dim=-1)


def oracle_error(positions, global_box, query_box, global_flip, query_flip, image=None):
    """Largest distance (global patches) between each query patch's pixel centre, seen in the
    displayed global view, and the centre implied by positions (top-left + half an extent)."""
    image = coordinate_image() if image is None else image
    query_view = pqcl.PQCLAugmentation.crop(image, query_box, ORACLE_QUERY, query_flip)
    seen = in_global_frame(patch_mean_source(query_view), global_box, global_flip)
    extent = torch.tensor([query_box[2] / ORACLE_QUERY_GRID * ORACLE_GRID / global_box[2],
                           query_box[3] / ORACLE_QUERY_GRID * ORACLE_GRID / global_box[3]], dtype=torch.float64)
    return (seen - (positions.double() + extent / 2)).abs().max().item()


@st.composite
def boxes(draw, min_side, max_side, image=SOURCE):
    """(top, left, height, width) inside the image, as RandomResizedCrop.get_params returns."""
    height, width = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    return draw(st.integers(0, image - height)), draw(st.integers(0, image - width)), height, width


@pytest.mark.parametrize("global_flip,query_flip", list(itertools.product([False, True], repeat=2)))
@settings(max_examples=30, deadline=None)
@given(global_box=boxes(32, SOURCE), query_box=boxes(8, 48))
def test_relative_positions_match_pixel_oracle(global_flip, query_flip, global_box, query_box):
    """Each query patch's mean source pixel, in the displayed global view, is the patch centre
    the positions predict; the same frame map sends the global view's own patches to i + 0.5."""
    image = coordinate_image()
    global_view = pqcl.PQCLAugmentation.crop(image, global_box, ORACLE_SIZE, global_flip)
    rows, cols = torch.meshgrid(torch.arange(ORACLE_GRID) + 0.5, torch.arange(ORACLE_GRID) + 0.5, indexing="ij")
    frame = in_global_frame(patch_mean_source(global_view), global_box, global_flip)
    assert (frame - torch.stack([rows, cols], -1)).abs().max() < ORACLE_TOL
    positions = pqcl.relative_positions(global_box, query_box, ORACLE_GRID, ORACLE_QUERY_GRID, global_flip, query_flip)
    assert positions.shape == (ORACLE_QUERY_GRID, ORACLE_QUERY_GRID, 2)
    assert oracle_error(positions, global_box, query_box, global_flip, query_flip, image) < ORACLE_TOL


@pytest.mark.parametrize("query_flip", [False, True])
def test_pixel_oracle_rejects_unflipped_positions(query_flip):
    """The authors' formula (global flip ignored) misses the oracle by patches; ours is within tol."""
    global_box, query_box = (8, 4, 80, 88), (20, 10, 24, 30)  # query in the global view's left part
    args = (global_box, query_box, ORACLE_GRID, ORACLE_QUERY_GRID)
    right = pqcl.relative_positions(*args, global_flip=True, query_flip=query_flip)
    wrong = pqcl.relative_positions(*args, global_flip=False, query_flip=query_flip)
    assert oracle_error(right, global_box, query_box, True, query_flip) < ORACLE_TOL
    assert oracle_error(wrong, global_box, query_box, True, query_flip) > 100 * ORACLE_TOL


@settings(max_examples=100, deadline=None)
@given(box=boxes(1, 500, image=1000), grid=st.integers(1, 16), flip=st.booleans())
def test_query_equal_to_global_view_gives_integer_grid(box, grid, flip):
    """Same box, grid and flip: positions are exactly (i, j), as the global view's own patches."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    expected = torch.stack([rows, cols], -1).float()
    assert torch.equal(pqcl.relative_positions(box, box, grid, grid, flip, flip), expected)


# --------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------

AUG_SIZES = dict(img_size=32, patch_size=4, query_size=16)  # G = 8, l = 4, L = 16
AUG_IMAGE = torch.randint(0, 256, (3, 48, 40), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def augment(seed, **config):
    aug = pqcl.PQCLAugmentation.from_config(pqcl.Config(**{**AUG_SIZES, **config}))
    torch.manual_seed(seed)
    return aug(AUG_IMAGE)


@pytest.mark.parametrize("num_queries", [0, 1, 3])
def test_augmentation_shapes_and_positions(num_queries):
    """Documented shapes/dtypes; query_pos = relative_positions of the reported boxes and flips."""
    out = augment(0, num_queries=num_queries, query_weight=1.0 if num_queries else 0.0)
    V, Q, G, l = 2, num_queries, 8, 4
    expected = {"globals": ((V, 3, 32, 32), torch.float32), "queries": ((Q, 3, 16, 16), torch.float32),
                "query_pos": ((V, Q, l * l, 2), torch.float32), "masks": ((V, G, G), torch.bool),
                "global_boxes": ((V, 4), torch.long), "query_boxes": ((Q, 4), torch.long),
                "global_flips": ((V,), torch.bool), "query_flips": ((Q,), torch.bool),
                "locals": ((0, 3, 96, 96), torch.float32), "local_boxes": ((0, 4), torch.long),
                "local_flips": ((0,), torch.bool)}  # no local crops by default
    assert {k: (tuple(v.shape), v.dtype) for k, v in out.items()} == expected
    for v, q in itertools.product(range(V), range(Q)):
        ref = pqcl.relative_positions(out["global_boxes"][v].tolist(), out["query_boxes"][q].tolist(), G, l,
                                      bool(out["global_flips"][v]), bool(out["query_flips"][q]))
        assert torch.equal(out["query_pos"][v, q], ref.flatten(0, 1))
    for box in (*out["global_boxes"], *out["query_boxes"]):  # boxes lie inside the 48 x 40 image
        top, left, h, w = box.tolist()
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 40 and h > 0 and w > 0


def pixel_frame(global_view, patch=ORACLE_PATCH):
    """A displayed global view of the coordinate image -> the map source (y, x) -> (row, col) in
    its patch units, read off the view's own pixels alone: the source coordinate of each
    patch row (column) is a line in the patch centre i + 0.5, fitted by least squares and
    inverted. A flipped view shows a falling x, so its columns come out mirrored by themselves."""
    means = patch_mean_source(global_view, patch)  # (G, G, 2) source (y, x)
    centres = torch.arange(means.shape[0], dtype=torch.float64) + 0.5
    design = torch.stack([torch.ones_like(centres), centres], dim=1)  # (G, 2)
    lines = [torch.linalg.lstsq(design, means[..., axis].mean(1 - axis)[:, None]).solution.flatten()
             for axis in (0, 1)]  # (offset, slope) of source y over rows, of source x over columns
    return lambda yx: torch.stack([(yx[..., axis] - lines[axis][0]) / lines[axis][1] for axis in (0, 1)], dim=-1)


def test_augmentation_positions_match_pixel_oracle_for_every_flip():
    """PQCLAugmentation itself, its colour steps replaced by the identity, on the coordinate
    image: in every sample, each query patch of each crop, seen in each displayed global view
    through that view's own pixels (pixel_frame; no box or flip the augmentation reports), has
    its centre where query_pos puts it. Flips are read off the pixels too, and over the seeds
    every combination of view 1's, view 2's and the crop's flip occurs, so positions computed
    with the wrong view's flip (or none) cannot pass."""
    aug = pqcl.PQCLAugmentation(global_size=ORACLE_SIZE, query_size=ORACLE_QUERY, patch_size=ORACLE_PATCH,
                                num_queries=2)
    aug.global_pixels, aug.query_pixels = [lambda view: view] * 2, lambda view: view
    image, l = coordinate_image(), ORACLE_QUERY_GRID
    combinations = set()
    for seed in range(24):
        torch.manual_seed(seed)
        out = aug(image)
        frames = [pixel_frame(view) for view in out["globals"]]
        global_flips = [bool(view[0, 0, -1] < view[0, 0, 0]) for view in out["globals"]]  # source x falls
        for q, crop in enumerate(out["queries"]):
            combinations.add((*global_flips, bool(crop[0, 0, -1] < crop[0, 0, 0])))
            for v, frame in enumerate(frames):
                seen = frame(patch_mean_source(crop))  # (l, l, 2) patch centres in view v
                extent = torch.stack([seen[1, 0, 0] - seen[0, 0, 0], (seen[0, 1, 1] - seen[0, 0, 1]).abs()])
                positions = out["query_pos"][v, q].view(l, l, 2).double()
                assert (seen - (positions + extent / 2)).abs().max() < ORACLE_TOL, (seed, v, q)
        assert out["global_flips"].tolist() == global_flips
    assert combinations == set(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augmentation_views_independent_of_framework_and_query_count(seed):
    """Same seed: iBOT/DINO and Q = 0/1/3 see identical globals; query crops are a common prefix."""
    runs = {(framework, Q): augment(seed, framework=framework, num_queries=Q, query_weight=1.0 if Q else 0.0)
            for framework, Q in itertools.product(["ibot", "dino"], [0, 1, 3])}
    ref = runs["ibot", 3]
    for (framework, Q), out in runs.items():
        for key in ("globals", "global_boxes", "global_flips"):
            assert torch.equal(out[key], ref[key]), (framework, Q, key)
        for key in ("queries", "query_boxes", "query_flips"):
            assert torch.equal(out[key], ref[key][:Q]), (framework, Q, key)
        if framework == "ibot":
            assert torch.equal(out["masks"], ref["masks"])
        else:
            assert not out["masks"].any()


# --------------------------------------------------------------------------------------
# Block masks
# --------------------------------------------------------------------------------------


def covered_by_full_2x2(mask):
    """numpy: True where the patch lies in some 2x2 square whose four patches are all masked."""
    m = np.asarray(mask)
    square = m[:-1, :-1] & m[1:, :-1] & m[:-1, 1:] & m[1:, 1:]
    covered = np.zeros_like(m)
    for dr, dc in itertools.product([0, 1], repeat=2):
        covered[dr:dr + square.shape[0], dc:dc + square.shape[1]] |= square
    return covered


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 16), cols=st.integers(1, 16), ratio=st.floats(0, 0.95), seed=st.integers(0, 2**31))
def test_block_mask_never_exceeds_ratio(rows, cols, ratio, seed):
    """At most ratio * N patches are masked, for any grid and ratio."""
    mask = pqcl.block_mask(rows, cols, ratio, torch.Generator().manual_seed(seed))
    assert mask.shape == (rows, cols) and mask.dtype == torch.bool
    assert mask.sum().item() <= ratio * rows * cols


@pytest.mark.parametrize("grid", [9, 14])
def test_block_mask_close_to_ratio_on_average(grid):
    """Mean masked count falls short of ratio * N by less than half the smallest block.

    Blocks hold >= (G // 3)^2 patches and may not overshoot, so masking stops once the
    remaining budget is below a block: the shortfall mostly lies in [0, min block), and
    its mean, measured ~1.5-3 patches here, must stay below min_block / 2 (4.5 and 8)."""
    min_block, N = (grid // 3) ** 2, grid * grid
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5):
        gen = torch.Generator().manual_seed(0)
        counts = [pqcl.block_mask(grid, grid, ratio, gen).sum().item() for _ in range(100)]
        assert ratio * N - np.mean(counts) < min_block / 2, ratio


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(9, 16), cols=st.integers(9, 16), ratio=st.floats(0.1, 0.5), seed=st.integers(0, 2**31))
def test_block_mask_is_made_of_blocks(rows, cols, ratio, seed):
    """Grids >= 9: while at least (G//3)^2 >= 9 patches of budget remain, blocks have area
    >= 9 and aspect <= 1/0.3, so sides >= 2; only the final blocks, adding fewer than
    (G//3)^2 patches in all, may be thin. So fewer than (G//3)^2 masked patches lie outside
    a fully masked 2x2 square (numpy check), and most masks have none."""
    mask = pqcl.block_mask(rows, cols, ratio, torch.Generator().manual_seed(seed)).numpy()
    outside_blocks = (mask & ~covered_by_full_2x2(mask)).sum()
    assert outside_blocks < (min(rows, cols) // 3) ** 2


def test_block_mask_is_deterministic_by_generator():
    """Same generator seed -> same mask whatever the global RNG; seeds matter; global RNG untouched."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = [pqcl.block_mask(14, 14, 0.4, torch.Generator().manual_seed(s)) for s in range(8)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(100)
    second = [pqcl.block_mask(14, 14, 0.4, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len({tuple(m.flatten().tolist()) for m in first}) > 1


def test_mask_ratio_distribution():
    """iBOT ratios: a fair coin between exactly 0 and U(0.1, 0.5) (binomial / uniform bounds)."""
    gen = torch.Generator().manual_seed(0)
    draws = np.array([pqcl.sample_mask_ratio(generator=gen) for _ in range(2000)])
    zero = draws == 0
    assert abs(zero.mean() - 0.5) < 4 * math.sqrt(0.25 / 2000)  # 4 sigma of a fair coin
    rest = draws[~zero]
    assert rest.min() >= 0.1 and rest.max() <= 0.5
    assert abs(rest.mean() - 0.3) < 4 * 0.4 / math.sqrt(12 * len(rest))  # 4 sigma of U(0.1, 0.5)
    again = torch.Generator().manual_seed(0)
    assert [pqcl.sample_mask_ratio(generator=again) for _ in range(20)] == draws[:20].tolist()


# --------------------------------------------------------------------------------------
# Losses (Eq. 2, 8, 9), centers, EMA teacher
# --------------------------------------------------------------------------------------


def perturb_teacher_(model, std=0.05, seed=11):
    """Move every teacher parameter away from the student's: at construction the teacher is a
    copy of the student, so a test on a fresh model cannot tell which branch computed what.
    (randomize_ skips the teacher: its parameters do not require grad.)"""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.teacher.parameters():
            if p is not model.teacher.backbone.pos_embed:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def augmented_batch(cfg, seed=0):
    """A real collated batch from PQCLAugmentation (random uint8 images)."""
    aug = pqcl.PQCLAugmentation.from_config(cfg)
    torch.manual_seed(seed)
    samples = [aug(torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)) for _ in range(BATCH)]
    return torch.utils.data.default_collate(samples)


@pytest.mark.parametrize("framework", ["ibot", "dino"])
def test_gradients_reach_student_only(framework):
    """After backward every trainable student tensor has a finite grad; the teacher has none."""
    model = tiny_pqcl(framework=framework).train()
    out = model(augmented_batch(model.cfg))
    out["loss"].backward()
    trainable = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.isfinite().all() for _, p in trainable)
    assert any(p.grad.abs().sum() > 0 for n, p in trainable if n.startswith("backbone.blocks"))
    assert model.student.backbone.mask_token.grad.abs().sum() > 0  # query tokens start from it
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())


@pytest.mark.parametrize("head_mode", ["shared", "semi-shared"])
def test_update_teacher_is_ema_toward_student(head_mode):
    """teacher' = m * teacher + (1 - m) * student by name (hand formula); distance shrinks."""
    model = tiny_pqcl(head_mode=head_mode)
    randomize_(model.student, std=0.1, seed=3)
    student = dict(model.student.named_parameters())
    before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    model.update_teacher(0.9)
    for name, t in model.teacher.named_parameters():
        torch.testing.assert_close(t, 0.9 * before[name] + 0.1 * student[name].detach(), atol=1e-6, rtol=1e-6)
        if not torch.equal(before[name], student[name]):
            assert (t - student[name]).norm() < (before[name] - student[name]).norm()


def test_centers_move_toward_teacher_batch_mean():
    """Each center = m * old + (1 - m) * mean of teacher logits recomputed by hand per token type
    (the teacher perturbed away from the student, so the student's logits would miss)."""
    model = perturb_teacher_(tiny_pqcl(num_queries=2))
    batch = tiny_batch(model.cfg)
    old = {k: torch.randn(64) for k in ("cls", "patch", "query")}
    for kind, value in old.items():
        getattr(model, f"center_{kind}").copy_(value)
    with torch.no_grad():
        backbone, head = model.teacher.backbone, model.teacher.heads["cls"]
        views = backbone(batch["globals"].flatten(0, 1))  # (B*V, R, D)
        crops = backbone(batch["queries"].flatten(0, 1))[:, 1:]  # (B*Q, L, D)
        means = {"cls": head(views[:, 0]).mean(0), "patch": head(views[:, 1:]).flatten(0, 1).mean(0),
                 "query": head(crops).flatten(0, 1).mean(0)}
    model.eval()(batch)
    m = model.cfg.center_momentum
    for kind in old:
        torch.testing.assert_close(getattr(model, f"center_{kind}"), m * old[kind] + (1 - m) * means[kind],
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("framework", ["ibot", "dino"])
def test_query_weight_zero_is_the_baseline(framework):
    """query_weight 0: loss = cls + patch of the same weights with queries on; no query crop
    ever reaches the teacher."""
    with_queries = tiny_pqcl(framework=framework, query_weight=1.0)
    baseline = tiny_pqcl(framework=framework, query_weight=0.0)
    baseline.load_state_dict(with_queries.state_dict())
    batch = tiny_batch(with_queries.cfg)
    seen = []
    baseline.teacher.backbone.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    ref, out = loss_terms(with_queries, batch), loss_terms(baseline, batch)
    assert ref["query"] > 0
    assert (ref["patch"] == 0) == (framework == "dino")
    torch.testing.assert_close(out["loss"], ref["cls"] + ref["patch"], atol=1e-6, rtol=0)
    assert out["query"] == 0
    assert seen and all(size == IMG for size in seen)


def test_loss_weights_follow_eq9():
    """Eq. 9: loss = cls + patch_weight * patch + query_weight * query, terms from unit weights."""
    unit = tiny_pqcl()
    weighted = tiny_pqcl(patch_weight=0.5, query_weight=2.0)
    weighted.load_state_dict(unit.state_dict())
    batch = tiny_batch(unit.cfg)
    ref, out = loss_terms(unit, batch), loss_terms(weighted, batch)
    torch.testing.assert_close(out["loss"], ref["cls"] + 0.5 * ref["patch"] + 2.0 * ref["query"], atol=1e-6, rtol=0)


def test_forward_loss_matches_per_view_reference():
    """PQCL.forward = the three terms rebuilt view by view, image by image, crop by crop
    from the backbones and heads (explicit loops, random centers, eval mode). The teacher is
    perturbed first, and the reference names the teacher's and the student's modules, so
    targets computed with the student's backbone or heads (or the student with the teacher's)
    miss it."""
    model = perturb_teacher_(tiny_pqcl(num_queries=2)).eval()
    batch = tiny_batch(model.cfg)
    for kind in ("cls", "patch", "query"):
        getattr(model, f"center_{kind}").copy_(torch.randn(64))
    centers = {kind: getattr(model, f"center_{kind}").clone() for kind in ("cls", "patch", "query")}
    temp, student_temp = 0.05, model.cfg.student_temp
    with torch.no_grad():
        out = model(batch, teacher_temp=temp)
        t_backbone, t_head = model.teacher.backbone, model.teacher.heads["cls"]
        s_backbone, s_head = model.student.backbone, model.student.heads["cls"]

        def probs(logits, kind):
            return ((logits - centers[kind]) / temp).softmax(-1)

        def ce(target, logits):
            return -(target * (logits / student_temp).log_softmax(-1)).sum(-1)

        V, B = 2, BATCH
        teacher = [t_head(t_backbone(batch["globals"][:, v])) for v in range(V)]  # (B, R, K) per view
        student = [s_backbone.forward_student(batch["globals"][:, v], batch["query_pos"][:, v], batch["masks"][:, v])
                   for v in range(V)]
        cls = torch.stack([ce(probs(teacher[tv][b, 0], "cls"), s_head(student[sv][0][b, 0]))
                           for tv in range(V) for sv in range(V) if tv != sv for b in range(B)]).mean()
        patch = []
        for v, b in itertools.product(range(V), range(B)):
            masked = batch["masks"][b, v].flatten().nonzero().flatten()
            terms = [ce(probs(teacher[v][b, 1 + i], "patch"), s_head(student[v][0][b, 1 + i])) for i in masked]
            patch.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
        crops = [[t_head(t_backbone(batch["queries"][b, q:q + 1])[0, 1:]) for q in range(2)] for b in range(B)]
        query = torch.stack([ce(probs(crops[b][q], "query"), s_head(student[v][1][b, q])).mean()
                             for v in range(V) for b in range(B) for q in range(2)]).mean()
    torch.testing.assert_close(out["cls"], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["patch"], torch.stack(patch).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["query"], query, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("student_views", ["local crops", "query as local"])
def test_multicrop_cls_loss_matches_per_pair_reference(student_views):
    """[CLS] term with student-only views (DINO multi-crop, or the paper's query-as-local
    baseline): every (teacher global view, student view) pair of different views counts once,
    rebuilt pair by pair from the modules named explicitly; the teacher is made to differ from
    the student, and it never sees the student-only views (its center ignores them)."""
    overrides = ({"local_crops_number": 2, "local_crops_size": 8} if student_views == "local crops"
                 else {"query_as_local": True, "query_weight": 0.0})
    model = tiny_pqcl(**overrides).eval()
    randomize_(model.teacher, std=0.2, seed=7)
    batch = tiny_batch(model.cfg)
    batch["locals"] = torch.randn(BATCH, 2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    extra = batch["locals"] if student_views == "local crops" else batch["queries"]  # (B, N, 3, 8, 8)
    model.center_cls.copy_(torch.randn(64))
    center, temp, student_temp = model.center_cls.clone(), 0.05, model.cfg.student_temp
    with torch.no_grad():
        t_backbone, t_head = model.teacher.backbone, model.teacher.heads["cls"]
        s_backbone, s_head = model.student.backbone, model.student.heads["cls"]
        V, N = 2, extra.shape[1]
        teacher = [((t_head(t_backbone(batch["globals"][:, v])[:, 0]) - center) / temp).softmax(-1) for v in range(V)]
        student = [s_head(s_backbone.forward_student(batch["globals"][:, v], None, batch["masks"][:, v])[0][:, 0])
                   for v in range(V)] + [s_head(s_backbone(extra[:, n])[:, 0]) for n in range(N)]
        pairs = [-(teacher[tv][b] * (student[sv][b] / student_temp).log_softmax(-1)).sum()
                 for tv in range(V) for sv in range(V + N) if sv != tv for b in range(BATCH)]
        out = model(batch, teacher_temp=temp)
    assert len(pairs) == V * (V + N - 1) * BATCH
    torch.testing.assert_close(out["cls"], torch.stack(pairs).mean(), atol=1e-5, rtol=1e-5)
    centers_after = model.center_cls.clone()
    model.center_cls.copy_(center)
    with torch.no_grad():
        model(dict(batch, locals=batch["locals"] + 1, queries=batch["queries"] + (student_views == "query as local")),
              teacher_temp=temp)
    if student_views == "local crops":
        assert torch.equal(model.center_cls, centers_after)  # the teacher's outputs ignore the local crops


def test_multicrop_off_ignores_local_crops():
    """local_crops_number 0: a batch's local crops change nothing (today's loss); on: they do."""
    off, on = tiny_pqcl(), tiny_pqcl(local_crops_number=2, local_crops_size=8)
    on.load_state_dict(off.state_dict())
    batch = tiny_batch(off.cfg)
    plain = loss_terms(off, batch)
    with_locals = dict(batch, locals=torch.randn(BATCH, 2, 3, 8, 8))
    assert all(torch.equal(loss_terms(off, with_locals)[k], plain[k]) for k in plain)
    assert loss_terms(on, with_locals)["cls"] != plain["cls"]


def test_query_as_local_feeds_the_query_pixels_to_the_student_and_no_query_tokens():
    """--query-as-local: the loss depends on the query crops' pixels through the student (a
    gradient reaches them); with query_weight 0 no query token is ever built (the positional
    branch costs nothing); without it the query pixels get no gradient (teacher only)."""
    def query_pixel_grad(model):
        batch = tiny_batch(model.cfg)
        batch["queries"].requires_grad_(True)
        model(batch)["loss"].backward()
        return batch["queries"].grad

    baseline = tiny_pqcl(query_as_local=True, query_weight=0.0).train()
    built = []
    original = baseline.student.backbone.forward_student
    with mock.patch.object(baseline.student.backbone, "forward_student",
                           lambda images, query_pos=None, mask=None: built.append(query_pos) or original(images, query_pos, mask)):
        grad = query_pixel_grad(baseline)
    assert grad is not None and grad.abs().sum() > 0
    assert built == [None]
    assert query_pixel_grad(tiny_pqcl().train()) is None


def test_entropy_by_hand():
    """H(p) in nats: (1/2, 1/4, 1/4) -> 1.5 ln 2; one-hot -> 0; uniform over K -> ln K."""
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 1.0, 0.0, 0.0], [0.25] * 4])
    torch.testing.assert_close(pqcl.entropy(probs), torch.tensor([1.5 * math.log(2), 0.0, math.log(4)]))


@pytest.mark.parametrize("rank", [1, 3, 10])
def test_effective_rank_of_a_rank_r_matrix(rank):
    """RankMe: r equal singular values -> exactly r; a random Gaussian rank-r matrix -> close
    to r (and never above it); a constant matrix -> 1."""
    gen = torch.Generator().manual_seed(rank)
    u, _ = torch.linalg.qr(torch.randn(200, rank, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, rank, generator=gen, dtype=torch.float64))
    assert pqcl.effective_rank(3.0 * u @ v.T).item() == pytest.approx(rank, rel=1e-4)
    gaussian = torch.randn(200, rank, generator=gen) @ torch.randn(rank, 64, generator=gen)
    assert 0.7 * rank <= pqcl.effective_rank(gaussian).item() <= rank + 1e-3
    assert pqcl.effective_rank(torch.full((50, 64), 2.5)).item() == pytest.approx(1.0, abs=1e-3)  # float32 SVD


def test_collapse_monitors_against_direct_computation():
    """monitor=True: entropy_T is the mean entropy of term T's teacher targets recomputed from
    the teacher's modules (patches: per image, then over images, as the patch term averages),
    kl_T = term - entropy_T >= 0 (Gibbs), and the loss terms are those of monitor=False."""
    model = tiny_pqcl(local_crops_number=2, local_crops_size=8).eval()
    randomize_(model.teacher, std=0.2, seed=5)
    batch = dict(tiny_batch(model.cfg), locals=torch.randn(BATCH, 2, 3, 8, 8))
    for kind in ("cls", "patch", "query"):
        getattr(model, f"center_{kind}").copy_(torch.randn(64))
    centers, temp = {name: b.clone() for name, b in model.named_buffers()}, 0.05
    with torch.no_grad():
        backbone, head = model.teacher.backbone, model.teacher.heads["cls"]

        def mean_entropy(logits, kind):  # (..., K) -> the mean of -sum p log p
            p = ((logits - centers[f"center_{kind}"]) / temp).softmax(-1)
            return (-(p * p.clamp(min=1e-45).log()).sum(-1)).mean()  # 0 log 0 = 0

        views = [head(backbone(batch["globals"][:, v])) for v in range(2)]  # (B, R, K) each
        crops = head(backbone(batch["queries"].flatten(0, 1))[:, 1:])
        per_image = [mean_entropy(views[v][b, 1:][batch["masks"][b, v].flatten()], "patch")
                     if batch["masks"][b, v].any() else torch.tensor(0.0) for v in range(2) for b in range(BATCH)]
        expected = {"cls": mean_entropy(torch.stack([x[:, 0] for x in views]), "cls"),
                    "patch": torch.stack(per_image).mean(), "query": mean_entropy(crops, "query")}
        out = model(batch, teacher_temp=temp, monitor=True)
        for name, buffer in model.named_buffers():
            buffer.copy_(centers[name])
        plain = model(batch, teacher_temp=temp)
    for term, h in expected.items():
        torch.testing.assert_close(out[f"entropy_{term}"], h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[f"kl_{term}"], out[term] - h, atol=1e-5, rtol=1e-5)
        assert out[f"kl_{term}"] >= 0 and torch.equal(out[term], plain[term])
    assert out["entropy_local"] == out["entropy_cls"] and out["kl_local"] >= 0
    assert out["teacher_cls_tokens"].shape == (2 * BATCH, DIM)


def log_softmax(xs):
    top = max(xs)
    log_sum = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - log_sum for x in xs]


def hand_ce(teacher_probs, student_logits, temp):
    return -sum(t * lp for t, lp in zip(teacher_probs, log_softmax([s / temp for s in student_logits])))


def test_teacher_probs_by_hand():
    """softmax((logits - center) / T) computed with math.exp."""
    logits, center, temp = [1.0, 2.0, 0.5], [0.5, 0.0, -0.5], 0.5
    scaled = [(l - c) / temp for l, c in zip(logits, center)]  # [1, 4, 2]
    expected = [math.exp(s) / sum(math.exp(v) for v in scaled) for s in scaled]
    got = pqcl.teacher_probs(torch.tensor([logits]), torch.tensor(center), temp)
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-6, rtol=0)


T0, T1 = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]  # teacher probabilities (K = 3)
S0, S1, S2 = [0.2, -0.1, 0.3], [-0.4, 0.5, 0.0], [0.1, 0.1, -0.3]  # student logits
STUDENT_TEMP = 0.1


def test_cls_loss_by_hand():
    """[CLS]: mean of H(teacher view 0, student view 1) and H(teacher 1, student 0) (V=2, B=1)."""
    student_cls, teacher_cls = torch.tensor([[S0], [S1]]), torch.tensor([[T0], [T1]])  # (V, B, K)
    expected = (hand_ce(T0, S1, STUDENT_TEMP) + hand_ce(T1, S0, STUDENT_TEMP)) / 2
    got = pqcl.cls_loss(student_cls, teacher_cls, STUDENT_TEMP)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_patch_loss_by_hand():
    """Masked patches: per-image mean over its masked tokens, images without any count as 0."""
    student, teacher = torch.tensor([S0, S1, S2]), torch.tensor([T0, T1, T0])
    image_index = torch.tensor([0, 0, 2])  # image 0: 2 tokens, image 1: none, image 2: 1 token
    per_image = [(hand_ce(T0, S0, STUDENT_TEMP) + hand_ce(T1, S1, STUDENT_TEMP)) / 2, 0.0,
                 hand_ce(T0, S2, STUDENT_TEMP)]
    got = pqcl.patch_loss(student, teacher, image_index, 3, STUDENT_TEMP)
    assert got.item() == pytest.approx(sum(per_image) / 3, rel=1e-5)


def test_query_loss_by_hand():
    """Query tokens of both views predict the same teacher tokens; mean over all (V=2, L=2)."""
    student = torch.tensor([[S0, S1], [S2, S0]]).view(2, 1, 1, 2, 3)  # (V, B, Q, L, K)
    teacher = torch.tensor([T0, T1]).view(1, 1, 2, 3)  # (B, Q, L, K)
    terms = [hand_ce(T0, S0, STUDENT_TEMP), hand_ce(T1, S1, STUDENT_TEMP),
             hand_ce(T0, S2, STUDENT_TEMP), hand_ce(T1, S0, STUDENT_TEMP)]
    assert pqcl.query_loss(student, teacher, STUDENT_TEMP).item() == pytest.approx(sum(terms) / 4, rel=1e-5)


@settings(max_examples=40, deadline=None)
@given(views=st.integers(1, 3), batch=st.integers(2, 6), dim=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_koleo_loss_matches_nearest_neighbour_loop(views, batch, dim, seed):
    """KoLeo: per view, minus the mean log Euclidean distance of each l2-normalised token to
    its nearest other token, found here by comparing every pair; summed over the views."""
    tokens = torch.randn(views, batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = 0.0
    for view in tokens:
        unit = [t / t.norm() for t in view]
        expected += sum(-math.log(min((unit[i] - unit[j]).norm().item() for j in range(batch) if j != i) + 1e-8)
                        for i in range(batch)) / batch
    assert pqcl.koleo_loss(tokens).item() == pytest.approx(expected, rel=1e-5, abs=1e-5)  # computed in fp32


def test_koleo_term_is_weighted_on_the_students_global_cls_tokens():
    """loss = Eq. 9 + koleo_weight * KoLeo of the student backbone's [CLS] tokens of each
    global view (the modules named here; the teacher made to differ), and with weight 0 the
    loss is bit-identical to the model without the term."""
    plain = perturb_teacher_(tiny_pqcl())
    weighted = tiny_pqcl(koleo_weight=0.3)
    weighted.load_state_dict(plain.state_dict())
    batch = tiny_batch(plain.cfg)
    ref, out = loss_terms(plain, batch), loss_terms(weighted, batch)
    with torch.no_grad():
        student_cls = torch.stack([weighted.student.backbone.forward_student(
            batch["globals"][:, v], batch["query_pos"][:, v], batch["masks"][:, v])[0][:, 0] for v in range(2)])
    torch.testing.assert_close(out["koleo"], pqcl.koleo_loss(student_cls), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], ref["loss"] + 0.3 * out["koleo"], atol=1e-5, rtol=0)
    assert ref["koleo"].item() == 0.0
    assert torch.equal(ref["loss"], ref["cls"] + ref["patch"] + ref["query"])


# --------------------------------------------------------------------------------------
# Parameters: count and timm names
# --------------------------------------------------------------------------------------


def vit_parameter_count(dim, depth, patch, grid, mlp_ratio=4):
    """A plain timm ViT (qkv bias) by formula, without classifier."""
    hidden = mlp_ratio * dim
    block = (2 * 2 * dim  # norm1, norm2
             + dim * 3 * dim + 3 * dim  # qkv
             + dim * dim + dim  # proj
             + dim * hidden + hidden  # fc1
             + hidden * dim + dim)  # fc2
    return (3 * patch * patch * dim + dim  # patch embedding conv
            + dim  # cls token
            + (1 + grid * grid) * dim  # pos_embed
            + depth * block + 2 * dim)  # blocks, final norm


@pytest.mark.parametrize("arch,img,patch", [("vit_test", IMG, PATCH), ("vit_small", 224, 16)])
def test_parameter_count_is_plain_vit_plus_mask_token(arch, img, patch):
    """Backbone parameters = plain ViT by formula + D (mask token); ViT-S/16 is timm's 21,665,664."""
    with mock.patch.dict(pqcl.ARCHS, TINY_ARCH):
        model = pqcl.build_backbone(arch, img_size=img, patch_size=patch)
    dim, depth, _ = {**pqcl.ARCHS, **TINY_ARCH}[arch]
    expected = vit_parameter_count(dim, depth, patch, img // patch)
    if arch == "vit_small":
        assert expected == 21_665_664
    assert sum(p.numel() for p in model.parameters()) == expected + dim


def test_state_dict_names_are_timm():
    """State-dict keys are exactly timm VisionTransformer's (depth 2) plus mask_token."""
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias"]
    timm_names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                  *[f"blocks.{i}.{name}" for i in range(2) for name in per_block], "norm.weight", "norm.bias"]
    assert sorted(tiny_vit().state_dict()) == sorted(timm_names + ["mask_token"])


# --------------------------------------------------------------------------------------
# Projection heads (Table 7)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_last_layer", [False, True])
def test_projection_head_is_weight_normed_linear_of_l2_bottleneck(norm_last_layer):
    """Gain g = 1 at init (frozen iff norm_last_layer); output = (z / |z|) (g V / |V|_rows)^T."""
    head = pqcl.ProjectionHead(8, out_dim=12, hidden_dim=16, bottleneck_dim=6, norm_last_layer=norm_last_layer)
    assert torch.nn.utils.parametrize.is_parametrized(head.last_layer, "weight")
    assert head.last_layer.bias is None
    gain, direction = (head.last_layer.parametrizations.weight.original0,
                       head.last_layer.parametrizations.weight.original1)
    assert gain.shape == (12, 1) and torch.equal(gain, torch.ones(12, 1))
    assert gain.requires_grad == (not norm_last_layer)
    randomize_(head, seed=5)
    with torch.no_grad():
        gain.copy_(torch.rand(12, 1) + 0.5)
        x = torch.randn(5, 8)
        fc1, fc2, fc3 = head.mlp[0], head.mlp[2], head.mlp[4]
        z = linear(gelu(linear(gelu(linear(x, fc1)), fc2)), fc3)
        z = z / z.norm(dim=-1, keepdim=True)
        weight = gain * direction / direction.norm(dim=1, keepdim=True)
        torch.testing.assert_close(head(x), z @ weight.T, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("framework", ["ibot", "dino"])
@pytest.mark.parametrize("head_mode", ["shared", "semi-shared", "vanilla"])
def test_head_modes_follow_table_7(head_mode, framework):
    """Table 7: shared = one head for all; semi-shared = student per type, teacher one; vanilla =
    per type on both. Perturbing a student head changes exactly the terms it serves."""
    model = tiny_pqcl(head_mode=head_mode, framework=framework)
    types = ["cls", "query"] if framework == "dino" else ["cls", "patch", "query"]
    student_heads = ["cls"] if head_mode == "shared" else types
    teacher_heads = types if head_mode == "vanilla" else ["cls"]
    assert sorted(model.student.heads) == sorted(student_heads)
    assert sorted(model.teacher.heads) == sorted(teacher_heads)
    batch = tiny_batch(model.cfg)
    before = loss_terms(model, batch)
    for name in student_heads:
        perturbed = copy.deepcopy(model)
        randomize_(perturbed.student.heads[name], seed=9)
        after = loss_terms(perturbed, batch)
        served = set(types) if name == "cls" and head_mode == "shared" else {name}
        for term in types:
            assert (after[term] != before[term]) == (term in served), (name, term)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------


def test_cosine_schedule_endpoints_and_warmup():
    """Warm-up is linear from warmup_start; cosine hits base, the midpoint mean, final, then stays."""
    assert pqcl.cosine_schedule(0, 100, 1.0, 0.0) == pytest.approx(1.0)
    assert pqcl.cosine_schedule(50, 100, 1.0, 0.0) == pytest.approx(0.5)
    assert pqcl.cosine_schedule(100, 100, 1.0, 0.0) == pytest.approx(0.0)
    assert pqcl.cosine_schedule(150, 100, 1.0, 0.0) == pytest.approx(0.0)
    assert pqcl.cosine_schedule(0, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) == pytest.approx(0.2)
    assert pqcl.cosine_schedule(5, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) == pytest.approx(0.6)
    assert pqcl.cosine_schedule(10, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) == pytest.approx(1.0)
    assert pqcl.cosine_schedule(55, 100, 1.0, 0.0, warmup_steps=10, warmup_start=0.2) == pytest.approx(0.5)


def test_training_schedules():
    """lr: linear scaling rule, warm-up from 0, cosine to min_lr; weight decay 0.04 -> 0.4;
    teacher momentum 0.996 -> 1; teacher temperature 0.04 -> 0.07 over its warm-up, then flat."""
    cfg = pqcl.Config(epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=4, batch_size=64)
    spe, total = 10, 100
    peak = 5e-4 * 64 * 4 / 256
    assert pqcl.learning_rate(cfg, 0, spe, world_size=4) == 0
    assert pqcl.learning_rate(cfg, 10, spe, world_size=4) == pytest.approx(peak / 2)
    assert pqcl.learning_rate(cfg, 20, spe, world_size=4) == pytest.approx(peak)
    assert pqcl.learning_rate(cfg, 60, spe, world_size=4) == pytest.approx((peak + 1e-6) / 2)
    assert pqcl.learning_rate(cfg, total, spe, world_size=4) == pytest.approx(1e-6)
    assert pqcl.learning_rate(cfg, 20, spe) == pytest.approx(5e-4 * 64 / 256)
    assert pqcl.weight_decay(cfg, 0, spe) == pytest.approx(0.04)
    assert pqcl.weight_decay(cfg, total // 2, spe) == pytest.approx(0.22)
    assert pqcl.weight_decay(cfg, total, spe) == pytest.approx(0.4)
    assert pqcl.teacher_momentum(cfg, 0, spe) == pytest.approx(0.996)
    assert pqcl.teacher_momentum(cfg, total // 2, spe) == pytest.approx(0.998)
    assert pqcl.teacher_momentum(cfg, total, spe) == pytest.approx(1.0)
    assert pqcl.teacher_temperature(cfg, 0, spe) == pytest.approx(0.04)
    assert pqcl.teacher_temperature(cfg, 20, spe) == pytest.approx(0.055)
    assert pqcl.teacher_temperature(cfg, 40, spe) == pytest.approx(0.07)
    assert pqcl.teacher_temperature(cfg, total, spe) == pytest.approx(0.07)


# --------------------------------------------------------------------------------------
# Invalid configurations
# --------------------------------------------------------------------------------------

INVALID = [
    ("embed_dim", lambda: pqcl.VisionTransformer(img_size=16, patch_size=4, embed_dim=30, depth=1, num_heads=3)),
    ("embed_dim", lambda: pqcl.sincos_2d(torch.zeros(1), torch.zeros(1), 30)),
    ("img_size", lambda: pqcl.Config(img_size=30, patch_size=4, query_size=16)),
    ("img_size", lambda: pqcl.VisionTransformer(img_size=30, patch_size=4, embed_dim=32, depth=1, num_heads=4)),
    ("img_size", lambda: pqcl.PQCLAugmentation(global_size=30, query_size=16, patch_size=4)),
    ("query_size", lambda: pqcl.Config(img_size=32, patch_size=4, query_size=10)),
    ("query_size", lambda: pqcl.PQCLAugmentation(global_size=32, query_size=10, patch_size=4)),
    ("global_scale", lambda: pqcl.Config(global_scale=(0.0, 1.0))),
    ("global_scale", lambda: pqcl.Config(global_scale=(0.5, 0.2))),
    ("global_scale", lambda: pqcl.Config(global_scale=(0.25, 1.5))),
    ("query_scale", lambda: pqcl.Config(query_scale=(-0.1, 0.25))),
    ("query_scale", lambda: pqcl.Config(query_scale=(0.05, 1.1))),
    ("mask_ratios", lambda: pqcl.Config(mask_ratios=(0.0, 0.9), mask_ratio_vars=(0.0, 0.2))),
    ("mask_ratios", lambda: pqcl.Config(mask_ratios=(0.0, 0.1), mask_ratio_vars=(0.0, 0.2))),
    ("mask_ratios", lambda: pqcl.Config(mask_ratios=(-0.1,), mask_ratio_vars=(0.0,))),
    ("framework", lambda: pqcl.Config(framework="mae")),
    ("head_mode", lambda: pqcl.Config(head_mode="separate")),
    ("arch", lambda: pqcl.Config(arch="vit_huge")),
    ("arch", lambda: pqcl.build_backbone("vit_huge")),
    ("num_queries", lambda: pqcl.Config(num_queries=0, query_weight=1.0)),
    ("clip_grad", lambda: pqcl.Config(clip_grad=-1.0)),
    ("koleo_weight", lambda: pqcl.Config(koleo_weight=-0.1)),
    ("koleo_weight", lambda: pqcl.Config(koleo_weight=0.5, batch_size=1)),
]


@pytest.mark.parametrize("param,build", INVALID, ids=[f"{p}-{i}" for i, (p, _) in enumerate(INVALID)])
def test_invalid_configuration_names_the_parameter(param, build):
    """Each invalid setting raises ValueError whose message names the offending parameter."""
    with pytest.raises(ValueError, match=rf"\b{re.escape(param)}\b"):
        build()


# --------------------------------------------------------------------------------------
# ---- visualize.py: the picture of a query crop, its attention and its prototypes
# --------------------------------------------------------------------------------------


VIS_SIZE, VIS_PATCH, VIS_QUERY = 32, 4, 16  # G = 8, l = 4


def footprint_outline(box, layout, width):
    """The pixels a `width`-px outline of the view-pixel box (x0, y0, x1, y1) lights in a
    panel, computed here by the pixel formula: display px = margin + view px * scale,
    the outline covering [x0, x1) x [y0, y1) and running inward from its edges."""
    x0, y0, x1, y1 = (layout.margin + v * layout.scale for v in box)
    assert all(float(v).is_integer() for v in (x0, y0, x1, y1)), "pick boxes on whole display pixels"
    ys, xs = torch.meshgrid(torch.arange(layout.panel), torch.arange(layout.panel), indexing="ij")
    inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    core = (xs >= x0 + width) & (xs < x1 - width) & (ys >= y0 + width) & (ys < y1 - width)
    return inside & ~core


@pytest.mark.parametrize("global_flip,query_flip", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("global_box,query_box", [
    ((4, 2, 64, 64), (20, 10, 16, 24)),  # inside the view, in its left half
    ((30, 40, 64, 64), (24, 30, 20, 28)),  # reaching above and left of the view, into the margin
])
def test_drawn_footprint_matches_boxes_and_flips(global_box, query_box, global_flip, query_flip):
    """The footprint drawn from relative_positions lights exactly the outline of the query
    box seen in the global view (mirrored when the view is flipped, whatever the crop's
    flip); the unflipped-view box, as a mishandled flip would place it, does not match."""
    grid, query_grid = VIS_SIZE // VIS_PATCH, VIS_QUERY // VIS_PATCH
    positions = pqcl.relative_positions(global_box, query_box, grid, query_grid, global_flip, query_flip)
    extent = visualize.patch_extent(global_box, query_box, grid, query_grid)
    footprint = visualize.position_box(positions.flatten(0, 1), extent, VIS_PATCH)
    layout = visualize.Layout(VIS_SIZE, 4)
    view = torch.zeros(3, VIS_SIZE, VIS_SIZE, dtype=torch.uint8)
    lit = (visualize.view_panel(view, layout, footprint) != visualize.view_panel(view, layout)).any(0)

    g_top, g_left, g_h, g_w = global_box
    q_top, q_left, q_h, q_w = query_box
    y0, y1 = (q_top - g_top) * VIS_SIZE / g_h, (q_top - g_top + q_h) * VIS_SIZE / g_h
    x0, x1 = (q_left - g_left) * VIS_SIZE / g_w, (q_left - g_left + q_w) * VIS_SIZE / g_w
    shown, mirrored = (x0, y0, x1, y1), (VIS_SIZE - x1, y0, VIS_SIZE - x0, y1)
    if global_flip:
        shown, mirrored = mirrored, shown
    assert torch.equal(lit, footprint_outline(shown, layout, visualize.FOOTPRINT_WIDTH))
    assert not torch.equal(lit, footprint_outline(mirrored, layout, visualize.FOOTPRINT_WIDTH))


@pytest.mark.parametrize("num_queries", [1, 2])
def test_picture_attention_reproduces_the_last_block(num_queries):
    """The weights read from the last block's qkv, applied to its values (raw tokens, then
    the crop's own), give exactly what pqcl.Attention passed to its output projection."""
    model = tiny_pqcl(num_queries=num_queries).eval()
    torch.manual_seed(0)
    sample = pqcl.PQCLAugmentation.from_config(model.cfg)(torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8))
    attn = model.student.backbone.blocks[-1].attn
    captured = {}
    hooks = [attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o)),
             attn.proj.register_forward_hook(lambda m, i, o: captured.setdefault("proj_in", i[0]))]
    with torch.no_grad():
        tokens, _ = model.student.backbone.forward_student(sample["globals"], sample["query_pos"])
    for hook in hooks:
        hook.remove()
    V, R, H, L = 2, tokens.shape[1], attn.num_heads, sample["query_pos"].shape[2]
    weights = visualize.query_attention(captured["qkv"], R, num_queries, H)  # (V, Q, H, L, R + L)
    assert weights.shape == (V, num_queries, H, L, R + L)
    assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-6)
    values = captured["qkv"].view(V, R + num_queries * L, 3, H, -1)[:, :, 2].transpose(1, 2)  # (V, H, T, hd)
    for q in range(num_queries):
        own = values[:, :, R + q * L:R + (q + 1) * L]  # (V, H, L, hd)
        mixed = weights[:, q] @ torch.cat([values[:, :, :R], own], dim=2)  # (V, H, L, hd)
        expected = captured["proj_in"][:, R + q * L:R + (q + 1) * L].unflatten(-1, (H, -1)).transpose(1, 2)
        assert torch.allclose(mixed, expected, atol=1e-5)


def student_prototypes(model, sample):
    """The student's prototype ids of the first query crop from each view (V, L): its
    backbone on each global view with the crop's positions there, then its head's argmax."""
    with torch.no_grad():
        ids = []
        for v in range(len(sample["globals"])):
            _, queries = model.student.backbone.forward_student(sample["globals"][v:v + 1], sample["query_pos"][v:v + 1])
            ids.append(model.student.heads["cls"](queries[0, 0]).argmax(-1))  # (L,)
        return torch.stack(ids)


def test_picture_command_writes_png_of_layout_size(tmp_path, capsys):
    """The command on a tiny checkpoint and an image file writes one PNG of the layout's
    size: 2 rows of (4 + marked patches) cells, and prints the agreement of the teacher's and
    the student's prototypes per view, recomputed here: the views drawn with the command's seed,
    the student's ids from each view (student_prototypes), and a center that makes the
    teacher's centered argmax prototype j everywhere (j the most frequent id from view A), so
    the agreement of a view is the share of its ids equal to j."""
    model = tiny_pqcl(query_size=12).eval()  # 3 x 3 query patches
    image = torch.randint(0, 256, (20, 28, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(image.numpy()).save(tmp_path / "source.png")
    with Image.open(tmp_path / "source.png") as source, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the command's default --seed
        student_ids = student_prototypes(model, data.augmentation(model.cfg)(source.convert("RGB")))  # (V, L)
    j = student_ids[0].mode().values.item()
    model.center_query.fill_(0.0)[j] = -1e4  # teacher logits lie within +-|g| = 1: argmax j everywhere
    expected = [(ids == j).double().mean().item() for ids in student_ids]
    assert expected[0] != expected[1]  # so views swapped, or one view's share printed twice, show
    checkpoint = {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                  "centers": {"center_query": model.center_query}, "config": dataclasses.asdict(model.cfg), "step": 7}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with mock.patch.dict(pqcl.ARCHS, TINY_ARCH):
        status = visualize.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--image",
                                 str(tmp_path / "source.png"), "--out", str(tmp_path / "pictures")])
    assert status == 0
    marked = visualize.marked_patches(3)
    layout = visualize.Layout(IMG, len(marked))
    assert layout.columns == 4 + len(marked) and layout.rows == 2
    with Image.open(tmp_path / "pictures" / "source.png") as picture:
        assert picture.size == (layout.width, layout.height)
    a, b = expected
    assert f"agreement view A {a:.0%}, view B {b:.0%}, mean {(a + b) / 2:.0%}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------
# ---- bench.py: its naive reference computes the fast path's loss; a smoke run
# --------------------------------------------------------------------------------------


def test_bench_naive_path_computes_the_fast_loss():
    """bench.NaivePQCL (masked full attention over [raw; queries], the head on every token)
    gives the fast path's loss terms, gradients and centers on the same batch and seed."""
    cfg = tiny_config()
    with mock.patch.dict(pqcl.ARCHS, TINY_ARCH):
        fast, naive = bench.build_model(cfg), bench.build_model(cfg, naive=True)
    assert any(isinstance(m, bench.NaiveAttention) for m in naive.modules())
    batch = bench.synthetic_batch(cfg, BATCH, seed=1)
    assert batch["masks"].any() and not batch["masks"].all()
    outputs = []
    for model in (fast, naive):
        torch.manual_seed(5)  # drop path on: the same draws
        terms = model(batch)
        params = [p for p in model.student.parameters() if p.requires_grad]
        outputs.append((terms, torch.autograd.grad(terms["loss"], params), model.center_patch.clone()))
    (fast_terms, fast_grads, fast_center), (naive_terms, naive_grads, naive_center) = outputs
    for name in ("loss", "cls", "patch", "query"):
        torch.testing.assert_close(naive_terms[name], fast_terms[name], rtol=1e-5, atol=1e-5)
    for g_naive, g_fast in zip(naive_grads, fast_grads):
        torch.testing.assert_close(g_naive, g_fast, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(naive_center, fast_center)


def counted_forward_flops(model, batch):
    """Matmul FLOPs of one forward, counted by torch.utils.flop_counter and split by branch:
    the patch embedding, each block and each head of the teacher and of the student (the
    losses' einsum lies outside them, as bench.step_flops leaves losses out). Attention runs as
    pqcl.matmul_attention, whose matmuls the counter sees (it does not count the CPU's fused SDPA)."""
    train_ddp.set_attention(model, pqcl.matmul_attention)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        model(batch)
    counts = {}
    for name, per_op in counter.get_flop_counts().items():
        match = re.fullmatch(r"\w+\.(teacher|student)\.(backbone\.patch_embed|backbone\.blocks\.\d+|heads\.\w+)", name)
        if match:
            counts[match[1]] = counts.get(match[1], 0) + sum(per_op.values())
    return counts


@pytest.mark.parametrize("naive", [False, True])
@pytest.mark.parametrize("framework,num_queries,query_weight", [("ibot", 2, 1.0), ("dino", 1, 1.0), ("ibot", 1, 0.0)])
def test_bench_flop_formula_counts_the_matmuls(naive, framework, num_queries, query_weight):
    """bench.step_flops (the module docstring's formulas) gives exactly the matmul FLOPs torch's
    counter sees in the teacher's and the student's forward, fast and naive path, iBOT (masked
    patches through the student head) and DINO, with and without query crops."""
    cfg = tiny_config(framework=framework, num_queries=num_queries, query_weight=query_weight)
    with mock.patch.dict(pqcl.ARCHS, TINY_ARCH):
        model = bench.build_model(cfg, naive=naive)
        batch = bench.synthetic_batch(cfg, BATCH, seed=1)
        expected = bench.step_flops(cfg, BATCH, bench.masked_tokens(cfg, batch), naive)
        counted = counted_forward_flops(model, batch)
    assert counted == {"teacher": expected["teacher"], "student": expected["student_forward"]}
    assert expected["total"] == expected["teacher"] + 3 * expected["student_forward"]


def test_bench_quick_run_figures_agree_with_each_other(tmp_path):
    """The quick run's figures hold together exactly: s/step is the median of the step times,
    img/s and TFLOP/s follow from it; variants that differ only in precision count the same
    FLOPs; PQCL-iBOT's extra FLOPs over iBOT (same batches, so the same masked tokens) are the
    query branch by formula; the fast-vs-naive ratio is made of the two variants' step times."""
    assert bench.main(["--quick", "--threads", "1", "--json", str(tmp_path / "bench.json")]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    figures = {(f["naive"], f["precision"], f["query_weight"]): f for f in results["figures"].values()}
    assert set(figures) == {(False, "fp32", 1.0), (True, "fp32", 1.0), (False, "fp32", 0.0), (False, "bf16", 1.0)}
    for f in figures.values():
        assert f["steps"] == len(f["step_times_s"]) >= 2
        assert f["s_per_step"] == statistics.median(f["step_times_s"])
        assert f["images_per_s"] == pytest.approx(f["batch_size"] / f["s_per_step"], rel=1e-12)
        assert f["tflops"] == pytest.approx(f["gflop_per_step"] / 1e3 / f["s_per_step"], rel=1e-12)
        assert f["peak_mb"] is None or f["peak_mb"] == pytest.approx(f["resting_mb"] + f["step_mb"], rel=1e-12)
    pqcl_fast, ibot = figures[False, "fp32", 1.0], figures[False, "fp32", 0.0]
    assert figures[False, "bf16", 1.0]["gflop_per_step"] == pqcl_fast["gflop_per_step"]
    # the query branch by hand (ViT-T, D 192): the teacher on each crop with its own [CLS], the
    # L query tokens in every student block (keys: the R raw tokens and the crop's own) and heads
    cfg = bench.plan(torch.device("cpu"), quick=True)["figures"][0]
    D, depth, P, B, V = 192, cfg.depth, cfg.patch_size, pqcl_fast["batch_size"], 2
    N, L, K = (cfg.img_size // P) ** 2, (cfg.query_size // P) ** 2, cfg.out_dim
    R, head = 1 + N, 2 * (D * cfg.hidden_dim + cfg.hidden_dim ** 2 + cfg.hidden_dim * cfg.bottleneck_dim
                          + cfg.bottleneck_dim * K)
    crop_teacher = B * (2 * L * 3 * P * P * D + depth * (24 * D * D * (1 + L) + 4 * D * (1 + L) ** 2)) + head * B * L
    query_student = V * B * depth * (24 * D * D * L + 4 * D * L * (R + L)) + head * V * B * L
    assert (pqcl_fast["gflop_per_step"] - ibot["gflop_per_step"]) * 1e9 == \
           pytest.approx(crop_teacher + 3 * query_student, rel=1e-9)
    speed_up = results["ratios"]["fast vs naive (ViT-T): speed-up"]
    naive = figures[True, "fp32", 1.0]
    assert speed_up["variants"] == [naive["label"], pqcl_fast["label"]]
    assert speed_up["per_pair"] == [a / b for a, b in zip(naive["step_times_s"], pqcl_fast["step_times_s"])]
    for ratio in (r for r in results["ratios"].values() if "per_pair" in r):
        assert ratio["median"] == statistics.median(ratio["per_pair"])
        assert (ratio["min"], ratio["max"]) == (min(ratio["per_pair"]), max(ratio["per_pair"]))
    assert results["data"]["images_per_s_per_worker"] > 0 and results["data"]["device_worker_samples_per_s"] > 0
    assert results["data"]["photometric"]["samples_per_s"] > 0


def test_bench_does_not_time_emulated_bf16(tmp_path):
    """Where a bf16 matmul runs below EMULATED_BF16 of fp32 (no avx512_bf16 or AMX), a full run
    reports the bf16 ratio as skipped with the measured matmul ratio and times no bf16 step."""
    quick_plan = bench.plan
    speeds = {torch.float32: 100.0, torch.bfloat16: 1.0}
    with mock.patch.object(bench, "plan", lambda device, quick: quick_plan(device, True)), \
            mock.patch.object(bench, "matmul_speed", lambda dtype, device: speeds[dtype]):
        assert bench.main(["--threads", "1", "--pairs", "2", "--no-compile", "--json", str(tmp_path / "b.json")]) == 0
    results = json.loads((tmp_path / "b.json").read_text())
    assert results["ratios"]["bf16 vs fp32: speed-up"] == {"skipped": "bf16 matmul 0.01x fp32: emulated on this CPU"}
    assert {f["precision"] for f in results["figures"].values()} == {"fp32"}
    assert results["matmul_gflops"] == {"float32": 100.0, "bfloat16": 1.0}


@pytest.mark.parametrize("size", [224, 96, 32])
def test_separable_blur_is_torchvision_blur(size):
    """data.SeparableGaussianBlur (two 1-D passes) = T.GaussianBlur with the same seed: one
    grey level at most on uint8 images, float rounding on float tensors."""
    kernel, sigma = 2 * round(0.05 * size) + 1, (0.1 * size / 224, 2.0 * size / 224)
    gen = torch.Generator().manual_seed(size)
    for image, tolerance in ((torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8, generator=gen), 1.0),
                             (torch.rand(2, 3, 40, 52, generator=gen), 1e-5)):
        torch.manual_seed(0)
        expected = T.GaussianBlur(kernel, sigma)(image)
        torch.manual_seed(0)
        blurred = data.SeparableGaussianBlur(kernel, sigma)(image)
        assert blurred.dtype == image.dtype and blurred.shape == image.shape
        assert (blurred.float() - expected.float()).abs().max() <= tolerance
