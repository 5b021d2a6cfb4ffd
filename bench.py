"""Time PQCL's training step, and measure what each of its speed choices is worth.

    python bench.py                        # CPU: ViT-S/16 and ViT-T/16, batch 8, every ratio (3 to 11 min on 2 cores)
    python bench.py --quick                # smoke run on a tiny model: seconds
    python bench.py --json bench.json      # also write every figure
    python bench.py --device cuda --peak-tflops 989   # GPU: ViT-S/16, ViT-B/16 at batch 64, bf16, compiled, MFU
                                                      # (989 = bf16 dense peak of an H100/H200 SXM)

One step is train_ddp.train_step, the step training runs: teacher forward (no grad),
student forward and backward, the three losses, per-tensor gradient clipping, fused
AdamW, the teacher EMA. Inputs are synthetic: B images x 2 global views of S px, 1 query
crop of 96 px, iBOT block masks at the recipe's ratio (pqcl.sample_mask_ratio +
pqcl.block_mask: per view 0, or U(0.1, 0.5) of the patches). Each figure is the median
over at least 5 steps after warm-up.

Ratios are measured interleaved: after warm-up, pair i runs one step of A and one of B
on the same batch and seed (A B, then B A in the next pair), and the ratio reported is
the median of the per-pair ratios, so that load from other processes on the machine
cancels. Absolute times on a shared CPU are noisy; the ratios much less so. A variant's
figures (s/step, memory) come from the steps of the first comparison it ran in.
    fast vs naive     pqcl.py against the authors' way (NaivePQCL below): hand-written
                      attention over [raw; queries] with an (R+QL) x (R+QL) boolean mask,
                      the student head on every token then selection; both fp32
    PQCL vs iBOT      the cost of the method on the recipe's model: query_weight 1
                      against 0 (plain iBOT)
    bf16 vs fp32      autocast on the step's device (not timed where bf16 is emulated: EMULATED_BF16)
    attention matmul  on a CPU, a bf16 step with attention as two matmuls (pqcl.matmul_attention)
                      against SDPA (train_ddp takes the matmuls where its probe finds them faster)
    compile vs eager  transformer blocks and heads compiled in place (train_ddp --compile);
                      the compile time is reported on its own

FLOPs (matmuls only; LayerNorm, GELU, softmax, losses, AdamW and EMA are not counted),
with D width, d depth, P patch, h, b, K the head widths (2048, 256, 8192):
    patch embedding     2 * 3P^2 * D per patch
    block, per token    2 * (3D^2 qkv + D^2 proj + 8D^2 MLP) = 24 D^2
    attention           4 * D * k per query token with k keys (QK^T and AV, all heads):
                        raw tokens k = R = 1 + N; query tokens k = R + L; naive path:
                        every token k = R + QL (the masked entries are computed too)
    head, per token     2 * (D h + h h + h b + b K), on the tokens it runs on: teacher on
                        [CLS], all patches and the query crops' patches; student on [CLS],
                        the M masked patches and the query tokens (naive: on every token;
                        DINO has no patch term, so [CLS] and the query tokens only)
    step                teacher forward + 3 x student forward (backward = 2 x forward)
Achieved TFLOP/s divides each variant's own count by its median step time.

Memory: on CUDA, torch.cuda.max_memory_allocated during the step. On the CPU, the
process's peak resident memory (VmHWM, reset through /proc/self/clear_refs before each
step, after glibc's free memory is handed back) minus its resident memory at that
moment; the variant's resident tensors (weights, buffers, AdamW state) are added to get
its peak. Every variant of a section is measured the same way in the same process.

Notes, measured on a 2-core avx512_bf16 Xeon without AMX shared with other jobs (A/B
figures are medians of interleaved pairs of complete steps, batch 8):
  * bf16 runs at ~0.65x the speed of fp32 here. Without AMX tiles oneDNN computes bf16
    GEMMs with avx512_bf16 dot products (vdpbf16ps), whose nominal 2x over fp32 FMAs is
    lost to operand repacking, to the casts autocast adds around every matmul and to the
    fp32 LayerNorm, softmax and losses; a lone matmul is ~0.6x too. So train_ddp's
    --precision auto takes fp32 there (its matmul probe; bf16 on GPUs). Where bf16 is emulated (no
    avx512_bf16 or AMX; one matmul 0.01-0.03x fp32 on a 2-core AVX2 EPYC) the bf16 step pairs are
    skipped (EMULATED_BF16) and the matmul figures stand for them.
  * Under bf16 autocast torch's CPU flash attention is slow at short sequences: on a 2-core
    Zen 4 EPYC (avx512_bf16, no AMX) its backward took 22 ms per call in bf16 against 1.7 ms
    in fp32 at 17 tokens, 38% of the Fashion-MNIST preset's step (torch.profiler); SDPA's math
    backend computes bf16 in fp32. Two bf16 matmuls and a softmax (pqcl.matmul_attention) took
    10 ms forward and backward at (128 images, 3 heads, 65 tokens) against 26-29 ms for SDPA
    in fp32 and 57-60 ms in bf16; the embedded preset's whole bf16 step ran 1.16-1.19x faster
    than with SDPA in fp32 (medians of 8 interleaved steps, 2026-12-07). So train_ddp probes both at start in a bf16 CPU
    run and takes the faster; the "attention matmul vs SDPA" ratio is that choice's worth.
  * torch.compile gains ~1.03x: the step is GEMM-bound and the GEMMs are the same library
    calls. Compiling ViT-T takes ~50 s with a cold inductor cache, seconds with a warm one.
    While drop path passed its rate to bernoulli_, each student block compiled its own
    graph and dynamo's recompile limit left blocks 8-11 eager (10 graphs, 53 s cold); now
    the blocks share one graph (6 graphs, 49 s cold).
  * Fast vs naive is bounded by FLOPs on ViT-S: the naive path's extra work (the head on
    ~3,100 more tokens, masked attention over all 233 tokens) adds 17% to the fast step's
    FLOPs (911 against 781 GFLOP); the teacher and the student backbone are common to both. On ViT-T the head
    costs more than the backbone per token, hence the larger gain there.
  * Kept in pqcl.py, each measured alone in the complete step: a single query crop attends
    to k, v as they are, no per-crop copy (1.03x ViT-T, 1.04x ViT-S, -49 MB); the teacher's
    targets and center update before the student runs, freeing the (V*B, N, K) patch
    logits (-105 MB on ViT-S, time unchanged); fused AdamW (76 ms against 248 ms foreach
    per ViT-S optimizer step); the Gaussian blur as two 1-D passes (2.8x images/s per data
    worker). Of the naive path's cost on ViT-S, the masked attention alone is ~1.12x and
    +300 MB, the head on every token ~1.09x and +290 MB.
  * Left out: the teacher head's last layer on the M masked patches only, the patch center
    being last_layer(mean of the l2-normalised bottlenecks), exact since that layer is
    linear: 1.04x on ViT-T but 1.01x on ViT-S (-60 MB), not worth hiding iBOT's center.
  * On CUDA the step's one host sync is the nonzero that counts the M masked patches
    (their number varies); centers, bincount and the off-diagonal [CLS] mean sync no more.
  * The CPU augmentation path (issue 12, item 1), one thread, 500 x 375 JPEGs, the ViT-S
    recipe's views; each lever alone, as interleaved A B / B A passes on a machine shared with
    four other developers (load average 1 to 7):
      - PIL's GaussianBlur (radius = sigma; an extended box blur: three box passes of variance
        sigma^2, edges extended instead of reflected; under 1 grey level mean, at most 4,
        from the exact Gaussian in test_train) against the separable exact blur: 1.05x
        (57.5 -> 61.5 samples/s, load ~1.3); the whole before/after in `python bench.py`:
        1.09x (18.6 -> 20.6 samples/s at load ~6.5, pairs 1.02-1.35x). Far from the issue's
        2.5x: measured here, the exact blur costs 2.4 ms per 224 px view (PIL's 1.9 ms), not
        the 6.4 ms of the issue's profile; a sample is ~17 ms at low load, of which JPEG decode
        1.5, resize 3, colour jitter ~5 (hue 2 ms per view: PIL's HSV conversions, 0.7 + 1.4 ms),
        blur ~3, finish 1.5, masks 0.8, the rest transform overhead.
      - drafted JPEG decoding: never applies to 500 x 375 photos (a 96 px query crop of scale
        0.05 can be 83 px wide, so no reduction keeps every crop at its size): 1.00x by
        construction; on 2000 x 1500 JPEGs (reduced 2x) 1.60x (6.0 -> 9.6 samples/s). Decoding
        these noisy JPEGs is entropy-bound, so the gain is in the resize, not the decode.
      - uint8 until the final normalisation and no PIL/tensor round trip: the PIL path now
        has none (the exact blur was the only one); fusing ToImage/ToDtype/Normalize into one
        op would save ~0.3 ms per view (0.6 against 0.33 ms), not done.
    So a worker gives ~60 samples/s at best here, and a GPU running ViT-S/16 at 35% MFU
    (~3,500 samples/s) needs ~57 workers: the photometric ops belong on the device (item 2).
  * The device path (issue 12, item 2; --augment-on device), same JPEGs and views, one thread,
    interleaved with the CPU path on a machine shared with other developers (load 5 to 7):
    the worker's share (decode, geometry, masks, positions, the parameter draws) runs 2.05x
    the CPU path (27.7 -> 55.6 samples/s, pairs 1.53-2.36x; a second run 15.6 -> 34.1,
    pairs 1.73-2.51x), so ~125 samples/s at low load and ~28 workers per GPU for 3,500
    samples/s. The batched photometric stage on this CPU: 9.9 samples/s with one thread
    (810 ms per batch of 8 x (2 x 224 px + 96 px)); with two threads on the loaded machine
    4.8 s (OpenMP threads waiting on busy cores). At each of the jitter's four positions every
    view makes one blend (brightness, contrast and saturation are one blend towards black, the
    mean grey or the pixel's grey: data.jitter_blend) and one hue rotation; before 2026-12-01
    it ran all three blends at each position with neutral factors. Same output bit for bit;
    interleaved A/B of the two stages on 16 global views of 224 px (8 pairs, machine idle):
    1.18x with one thread (344 -> 281 ms), 1.41x with two (247 -> 168 ms), pairs 0.86-1.77x.
    Gathering each position's views to run only their own op would need their count on the
    host (a sync); compiling the stage is not done (no GPU to measure it on).
  * PQCL-iBOT against iBOT (issue 12, item 3), 2026-12-01, one thread, the other core busy with
    a training run (scripts kept out of the project; figures are medians of interleaved pairs):
      - the matmul FLOPs the profiler counts in one ViT-S/16 step at batch 8: 722.7 against
        606.1 GFLOP, 1.19x, as step_flops says; the whole step on ViT-T/16 1.18-1.33x (4 pairs,
        median 1.26); on ViT-S `python bench.py` gave 1.28-1.32x in earlier runs: ~6-10% of the
        method's cost is not in its FLOPs;
      - where: one ViT-S block forward + backward on 16 views of 197 raw tokens with and without
        one 36-token query crop costs 1.24x for 1.18x the tokens; its attention alone 1.39x for
        ~1.2x the FLOPs. The crop's own SDPA call (36 queries over 233 keys) runs ~1.4x slower
        per FLOP than the 197 x 197 one; k and v feed two SDPA calls, so autograd adds their two
        gradients into the qkv gradient (copy_ + fill_ 14 against 6 ms); the cat of the two
        outputs adds 12 against 3 ms. The rest of the extra time is the FLOPs: the query
        tokens through every block and the shared head (ViT-T's head costs more per token than
        its backbone), the teacher on the 96-px crop (296 tokens, small GEMMs), the query
        term's log-softmax over K = 8192 per query token;
      - tried: both attention outputs written once into the (B, T, H, hd) layout (one cat of
        the transposed outputs instead of a cat and a transposed copy): 1.01-1.03x on the
        attention, not kept.
      - measured again on the idle machine, later that day (2-core AMD EPYC, AVX2, no code change
        to the step): `python bench.py --threads 1` 1.15x (13.77 against 12.05 s, 8 pairs
        1.04-1.45x) for 1.19x the FLOPs (782 against 658 GFLOP); the same pairs with a step
        script, one thread, 1.19x (1.12-1.31). With one thread the method costs its FLOPs and
        meets the 1.2x target. With two threads: 1.26x in `python bench.py` (9 pairs 1.02-1.30x),
        1.17x and 1.12x medians in the step script (pairs 0.88-1.49x): the host's noise on two
        threads is larger than the effect, so two-thread ratios are not figures here.
"""
import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

# A shared CPU: OpenMP threads that spin while waiting steal the cores other processes
# (and the other thread) need; passive waiting measured up to 3x faster under load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

import pqcl  # noqa: E402
import data  # noqa: E402
import train_ddp  # noqa: E402

ARCH_NAMES = {"vit_tiny": "ViT-T", "vit_small": "ViT-S", "vit_base": "ViT-B", "vit_large": "ViT-L"}
STEPS_PER_EPOCH = 1000  # for the schedules only; steps start after the last-layer freeze
# below this bf16/fp32 matmul speed bf16 is emulated (no avx512_bf16 or AMX: 0.01-0.03x on an AVX2
# EPYC, where 9 pairs of ViT-T bf16 steps had run over 10 minutes, unfinished): the pairs are skipped
EMULATED_BF16 = 0.25


# --------------------------------------------------------------------------------------
# Synthetic batches
# --------------------------------------------------------------------------------------


def synthetic_batch(cfg, batch_size, seed, device="cpu"):
    """A collated batch as PQCL.forward takes it, with masks drawn as the augmentation does."""
    gen = torch.Generator().manual_seed(seed)
    V, Q = 2, cfg.num_queries
    grid, q_grid = cfg.img_size // cfg.patch_size, cfg.query_size // cfg.patch_size
    masks = torch.stack([
        pqcl.block_mask(grid, grid, pqcl.sample_mask_ratio(cfg.mask_ratios, cfg.mask_ratio_vars, gen), gen,
                        cfg.mask_aspect)
        for _ in range(batch_size * V)]).view(batch_size, V, grid, grid)  # (B, V, G, G)
    batch = {
        "globals": torch.randn(batch_size, V, 3, cfg.img_size, cfg.img_size, generator=gen),  # (B, V, 3, S, S)
        "queries": torch.randn(batch_size, Q, 3, cfg.query_size, cfg.query_size, generator=gen),  # (B, Q, 3, s, s)
        "query_pos": torch.rand(batch_size, V, Q, q_grid * q_grid, 2, generator=gen) * grid,  # (B, V, Q, L, 2)
        "masks": masks,
    }
    return {k: v.to(device) for k, v in batch.items()}


def masked_tokens(cfg, batch):
    """M: masked patches the student's head and the patch loss see (0 without iBOT)."""
    return int(batch["masks"].sum()) if cfg.framework == "ibot" else 0


# --------------------------------------------------------------------------------------
# FLOPs, counted analytically (formulas in the module docstring)
# --------------------------------------------------------------------------------------


def step_flops(cfg, batch_size, masked, naive=False):
    """Matmul FLOPs of one training step: {'teacher', 'student_forward', 'total'}."""
    D, depth, _ = pqcl.ARCHS[cfg.arch]
    depth = cfg.depth or depth
    P, V, B = cfg.patch_size, 2, batch_size
    N, L = (cfg.img_size // P) ** 2, (cfg.query_size // P) ** 2
    R, Q = 1 + N, cfg.num_queries if cfg.use_queries else 0
    head = 2 * (D * cfg.hidden_dim + cfg.hidden_dim ** 2 + cfg.hidden_dim * cfg.bottleneck_dim
                + cfg.bottleneck_dim * cfg.out_dim)

    def vit(patches, tokens, attention_pairs):  # one image: embedding, d blocks, attention (query, key) pairs
        return 2 * patches * 3 * P * P * D + depth * (24 * D * D * tokens + 4 * D * attention_pairs)

    ibot = cfg.framework == "ibot"
    teacher = (V * B * vit(N, R, R * R) + B * Q * vit(L, 1 + L, (1 + L) ** 2)
               + head * (V * B * (1 + N * ibot) + B * Q * L))
    T = R + Q * L
    if naive:
        student = V * B * vit(N, T, T * T) + head * V * B * (T if ibot else 1 + Q * L)  # DINO: no patch term
    else:
        student = V * B * vit(N, T, R * R + Q * L * (R + L)) + head * (V * B + masked + V * B * Q * L)
    return {"teacher": teacher, "student_forward": student, "total": teacher + 3 * student}


# --------------------------------------------------------------------------------------
# The naive reference: the authors' attention and head placement, same weights and step
# --------------------------------------------------------------------------------------


def allowed_attention(num_raw, num_crops, num_tokens, device):
    """(T, T) bool: raw tokens see raw tokens; a crop's query tokens see raw tokens and their crop."""
    crop_len = (num_tokens - num_raw) // max(num_crops, 1)
    group = torch.arange(num_tokens, device=device)
    group = torch.where(group < num_raw, -1, (group - num_raw) // max(crop_len, 1))  # -1 raw, c for crop c
    return (group[None, :] == -1) | (group[:, None] == group[None, :])  # (query, key)


class NaiveAttention(pqcl.Attention):
    """softmax(q k^T / sqrt(hd)) v over the whole [raw; queries] sequence with a boolean mask."""

    def forward(self, x, num_raw, num_crops):
        B, T, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, hd)
        scores = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5  # (B, H, T, T)
        scores = scores.masked_fill(~allowed_attention(num_raw, num_crops, T, x.device), float("-inf"))
        out = scores.softmax(dim=-1) @ v  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class NaivePQCL(pqcl.PQCL):
    """PQCL as the authors' code computes it: NaiveAttention in every block and the student
    head on every token, the loss selecting [CLS], masked patches and queries afterwards.
    Same parameters (built from the same seed), same random draws, same loss."""

    def __init__(self, cfg):
        super().__init__(cfg)
        for module in self.modules():
            if isinstance(module, pqcl.Attention):
                module.__class__ = NaiveAttention

    def forward(self, batch, teacher_temp=None, monitor=False):
        if monitor:
            raise ValueError("the naive reference times steps without the collapse monitors")
        cfg = self.cfg
        teacher_temp = cfg.teacher_temp if teacher_temp is None else teacher_temp
        B, V = batch["globals"].shape[:2]
        images = batch["globals"].transpose(0, 1).flatten(0, 1)  # (V*B, 3, S, S), view-major
        masks = batch["masks"].transpose(0, 1).flatten(0, 1).flatten(1) if cfg.framework == "ibot" else None  # (V*B, N)
        query_pos = batch["query_pos"].transpose(0, 1).flatten(0, 1) if cfg.use_queries else None  # (V*B, Q, L, 2)
        with torch.no_grad():
            tokens = self.teacher.backbone(images)  # (V*B, R, D)
            inputs = {"cls": tokens[:, 0]}
            if masks is not None:
                inputs["patch"] = tokens[:, 1:]
            if query_pos is not None:
                crops = batch["queries"].flatten(0, 1)  # (B*Q, 3, s, s)
                inputs["query"] = self.teacher.backbone(crops)[:, 1:].unflatten(0, batch["queries"].shape[:2])
            teacher = pqcl.apply_heads(self.teacher.heads, inputs)
        tokens, query_tokens = self.student.backbone.forward_student(images, query_pos, masks)
        inputs = {"cls": tokens[:, 0]}
        if masks is not None:
            inputs["patch"] = tokens[:, 1:]  # every patch through the head, selected below
        if query_pos is not None:
            inputs["query"] = query_tokens
        student = pqcl.apply_heads(self.student.heads, inputs)

        def targets(kind, logits):
            return pqcl.teacher_probs(logits, getattr(self, f"center_{kind}"), teacher_temp)

        terms = {"cls": pqcl.cls_loss(student["cls"].unflatten(0, (V, B)),
                                      targets("cls", teacher["cls"]).unflatten(0, (V, B)), cfg.student_temp)}
        terms["patch"] = terms["query"] = terms["cls"].new_zeros(())
        if masks is not None:
            image_index = torch.arange(V * B, device=masks.device)[:, None].expand_as(masks)[masks]  # (M,)
            terms["patch"] = pqcl.patch_loss(student["patch"][masks], targets("patch", teacher["patch"][masks]),
                                             image_index, V * B, cfg.student_temp)
        if query_pos is not None:
            terms["query"] = pqcl.query_loss(student["query"].unflatten(0, (V, B)),
                                             targets("query", teacher["query"]), cfg.student_temp)
        loss = terms["cls"] + cfg.patch_weight * terms["patch"] + cfg.query_weight * terms["query"]
        self.update_centers(teacher)
        return {"loss": loss, **terms}


def build_model(cfg, device="cpu", naive=False):
    """PQCL (or its naive twin) with the weights that cfg.seed gives."""
    torch.manual_seed(cfg.seed)
    return (NaivePQCL if naive else pqcl.PQCL)(cfg).to(device)


# --------------------------------------------------------------------------------------
# Memory: CUDA's allocator peak, or the CPU process's resident peak around one step
# --------------------------------------------------------------------------------------


def _status_bytes(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def memory_mark(device):
    """Start of a step: reset the peak; returns the baseline (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    train_ddp.release_freed_memory()  # glibc keeps freed chunks resident unless asked
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        return _status_bytes("VmRSS")
    except OSError:
        return None


def memory_peak(device, mark):
    """Bytes above `mark` at the step's peak."""
    if mark is None:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - mark
    return max(0, _status_bytes("VmHWM") - mark)


def tensor_bytes(model, optimizer):
    """What a variant holds between steps: parameters, buffers, optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------------------
# Variants and their steps
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    cfg: pqcl.Config
    batch_size: int
    precision: str = "fp32"  # autocast dtype of the step: fp32 (none) or bf16
    compiled: bool = False
    naive: bool = False
    matmul_attention: bool = False  # attention as pqcl.matmul_attention instead of SDPA, as train_ddp may pick

    @property
    def label(self):
        cfg = self.cfg
        name = f"{ARCH_NAMES[cfg.arch]}/{cfg.patch_size}" + (f" depth {cfg.depth}" if cfg.depth else "")
        method = "PQCL-iBOT" if cfg.use_queries else "iBOT"
        return " ".join([name, f"{cfg.img_size}px", f"b{self.batch_size}", method, "naive" if self.naive else "fast",
                         self.precision] + (["matmul attention"] if self.matmul_attention else [])
                        + (["compiled"] if self.compiled else []))


class Trainer:
    """A variant's model and optimizer; `step` runs and times one train_ddp.train_step."""

    def __init__(self, variant, device, warmup=1):
        self.variant, self.device = variant, device
        # compiled: the first steps compile, then recompile for dynamic shapes (M varies per batch)
        self.warmup_steps = max(warmup, 3) if variant.compiled else warmup
        self.model = build_model(variant.cfg, device, variant.naive)
        self.optimizer = train_ddp.make_optimizer(self.model, device)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16}[variant.precision]
        train_ddp.set_attention(self.model, pqcl.matmul_attention if variant.matmul_attention
                                else torch.nn.functional.scaled_dot_product_attention)
        if variant.compiled:
            train_ddp.compile_model(self.model)  # lazy: the first steps compile
        self.step_index = variant.cfg.freeze_last_layer_epochs * STEPS_PER_EPOCH  # the last layer trains
        self.times, self.step_bytes, self.flops, self.warmup_times = [], [], [], []
        self.figure_steps = None  # the steps of its first comparison, timed next to one partner

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, batch, seed, record=True):
        mark = memory_mark(self.device)
        torch.manual_seed(seed)  # drop path draws: the same for every variant of a pair
        self._sync()
        start = time.perf_counter()
        schedule = train_ddp.schedule_at(self.variant.cfg, self.step_index, STEPS_PER_EPOCH)
        terms = train_ddp.train_step(self.model, self.optimizer, batch, schedule, amp_dtype=self.amp_dtype)
        self._sync()
        seconds = time.perf_counter() - start
        self.step_index += 1
        if not record:
            self.warmup_times.append(seconds)
            return seconds
        self.times.append(seconds)
        self.step_bytes.append(memory_peak(self.device, mark))
        cfg = self.variant.cfg
        flops = step_flops(cfg, self.variant.batch_size, masked_tokens(cfg, batch), self.variant.naive)
        self.flops.append(flops["total"])
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"{self.variant.label}: non-finite loss")
        return seconds

    def figures(self, peak_tflops=None):
        """The variant's figures over the steps of its first comparison: later ones ran at
        other times, under other load, and serve only their own ratios."""
        times = self.times[:self.figure_steps]
        seconds = statistics.median(times)
        flops = statistics.fmean(self.flops[:self.figure_steps])
        step_bytes = [b for b in self.step_bytes[:self.figure_steps] if b is not None]
        resting = tensor_bytes(self.model, self.optimizer)
        figures = {
            "label": self.variant.label, "arch": self.variant.cfg.arch, "batch_size": self.variant.batch_size,
            "precision": self.variant.precision, "compiled": self.variant.compiled, "naive": self.variant.naive,
            "query_weight": self.variant.cfg.query_weight, "steps": len(times), "step_times_s": times,
            "s_per_step": seconds, "images_per_s": self.variant.batch_size / seconds,
            "gflop_per_step": flops / 1e9, "tflops": flops / seconds / 1e12,
            "resting_mb": resting / 2**20,
            "step_mb": max(step_bytes) / 2**20 if step_bytes else None,
            "peak_mb": (resting + max(step_bytes)) / 2**20 if step_bytes else None,
        }
        if self.variant.compiled:  # the warm-up steps compiled the graphs: their excess over a compiled step
            figures["compile_s"] = sum(t - seconds for t in self.warmup_times)
        if peak_tflops:
            figures["mfu"] = figures["tflops"] / peak_tflops
        return figures


# --------------------------------------------------------------------------------------
# Interleaved measurement
# --------------------------------------------------------------------------------------


def run_interleaved(trainers, batch_for, pairs):
    """Warm up the trainers not yet warm, then `pairs` rounds of one step each on batch i,
    the order reversed every other round. Returns each trainer's step times."""
    for w in range(max(t.warmup_steps for t in trainers)):
        for trainer in trainers:
            if len(trainer.warmup_times) < trainer.warmup_steps:
                trainer.step(batch_for(100 + w), seed=100 + w, record=False)
    rounds = [[] for _ in trainers]
    for i in range(pairs):
        order = list(enumerate(trainers))
        for j, trainer in (order if i % 2 == 0 else order[::-1]):
            rounds[j].append(trainer.step(batch_for(i), seed=i))
    for trainer in trainers:
        trainer.figure_steps = trainer.figure_steps or len(trainer.times)
    return rounds


def ratio(numerator, denominator):
    """Median of per-pair ratios, and their range."""
    per_pair = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(per_pair), "min": min(per_pair), "max": max(per_pair),
            "per_pair": per_pair}


def matmul_speed(dtype, device, size=(1024, 384, 1536), repeats=5):
    """GFLOP/s of one (m x k) @ (k x n) matmul in `dtype`: what the GEMM library gives."""
    m, k, n = size
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * m * k * n / statistics.median(times[1:]) / 1e9


# --------------------------------------------------------------------------------------
# Data pipeline: augmentation throughput of one DataLoader worker, JPEG decoding included
# --------------------------------------------------------------------------------------


def write_jpegs(folder, count, size=(500, 375), seed=0):
    """ImageNet-like JPEGs: smooth random colour fields plus pixel noise at quality 90, which
    gives ImageNet's mean file size (~105 kB; ImageNet-1k train is 138 GB in 1.28 M files)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        noise = rng.normal(0, 24, (size[1], size[0], 3))
        image = np.asarray(coarse.resize(size, Image.BICUBIC), np.float32) + noise
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def augmentation_throughput(cfg, num_images, device, batch_size, rounds=4):
    """Samples/s of one worker (one thread, as a DataLoader worker has): data.ImageFiles (PIL
    decode) + data.augmentation (2 global views, the query crops, masks), interleaved A B / B A
    over `rounds` passes of the same JPEGs:
        before / after    the exact blur and full-size decoding against the CPU default (PIL
                          blur, drafted decoding), on 500 x 375 JPEGs
        draft             the CPU default with and without drafted decoding on 2000 x 1500
                          JPEGs (500 x 375 ones are never reduced for the recipe's crops)
        device worker     the CPU default against the device path's worker share (decode and
                          geometry, the photometric parameters drawn), on 500 x 375 JPEGs
    and the device path's other half, photometric_throughput on `device`."""
    threads = torch.get_num_threads()
    augment = {blur: data.augmentation(cfg, blur) for blur in data.BLURS}
    device_worker = data.augmentation(cfg, on="device")
    with tempfile.TemporaryDirectory() as root:
        photos, large = os.path.join(root, "photos"), os.path.join(root, "large")
        write_jpegs(os.path.join(photos, "class0"), num_images)
        write_jpegs(os.path.join(large, "class0"), max(4, num_images // 4), size=(2000, 1500))
        kb = statistics.fmean(os.path.getsize(os.path.join(photos, "class0", n)) for n in os.listdir(os.path.join(photos, "class0"))) / 1024
        comparisons = {
            "before / after": {
                "before": data.Augmented(data.ImageFiles(photos), augment["exact"], cfg.seed),
                "after": data.Augmented(data.ImageFiles(photos, augment["pil"].draft_reduction), augment["pil"], cfg.seed)},
            "draft (2000x1500)": {
                "full decode": data.Augmented(data.ImageFiles(large), augment["pil"], cfg.seed),
                "drafted": data.Augmented(data.ImageFiles(large, augment["pil"].draft_reduction), augment["pil"], cfg.seed)},
            "device worker": {
                "CPU path": data.Augmented(data.ImageFiles(photos, augment["pil"].draft_reduction), augment["pil"], cfg.seed),
                "worker share": data.Augmented(data.ImageFiles(photos, device_worker.draft_reduction), device_worker,
                                               cfg.seed)},
        }
        torch.set_num_threads(1)
        results = {"jpeg_kb": kb, "rounds": rounds}
        try:
            for name, (a, b) in ((name, list(pair.items())) for name, pair in comparisons.items()):
                times = {a[0]: [], b[0]: []}
                for round_index in range(rounds + 1):  # round 0 warms up
                    for label, dataset in ((a, b) if round_index % 2 == 0 else (b, a)):
                        start = time.perf_counter()
                        for index in range(len(dataset)):
                            dataset[(round_index, index)]
                        if round_index:
                            times[label].append((time.perf_counter() - start) / len(dataset))
                results[name] = {
                    **{f"{label}_samples_per_s": 1 / statistics.median(t) for label, t in times.items()},
                    "speed-up": ratio(times[a[0]], times[b[0]])}
        finally:
            torch.set_num_threads(threads)
        samples = data.Augmented(data.ImageFiles(photos, device_worker.draft_reduction), device_worker, cfg.seed)
        results["photometric"] = photometric_throughput(device_worker, samples, device, batch_size, rounds)
    results["images_per_s_per_worker"] = results["before / after"]["after_samples_per_s"]
    results["device_worker_samples_per_s"] = results["device worker"]["worker share_samples_per_s"]
    results["ms_per_image"] = 1000 / results["images_per_s_per_worker"]
    return results


def photometric_throughput(device_worker, samples, device, batch_size, repeats):
    """Samples/s of the device path's batched photometric stage (DeviceAugmentation.photometric,
    as train_ddp runs it after the batch reaches the device) on a collated batch of the worker's
    samples, with the training process's threads: the median of `repeats` after a warm-up."""
    batch = default_collate([samples[0, index % len(samples)] for index in range(batch_size)])
    batch = {key: value.to(device) for key, value in batch.items()}
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        device_worker.photometric(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    return {"device": str(device), "batch_size": batch_size, "ms_per_batch": 1000 * seconds,
            "samples_per_s": batch_size / seconds}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

TARGETS = {  # ratio name (start and end) -> (relation, the target on the 2-core CPU)
    "fast vs naive: speed-up": (">=", 1.3),
    "fast vs naive: peak memory": ("<=", 0.8),
    "PQCL-iBOT vs iBOT: cost": ("<=", 1.2),
    "bf16 vs fp32: speed-up": (">=", 2.5),
}
# Without a GPU figure, what a GPU would eat: an H100/H200 SXM (989 bf16 dense TFLOP/s) at
# the 35% MFU target.
GPU_TFLOPS, GPU_MFU = 989.0, 0.35


def plan(device, quick):
    """What to measure: configurations with figures (the first is the recipe's model), the
    configuration of the other ratios, batch size, interleaved pairs, warm-up steps, JPEGs."""
    if quick:
        tiny = pqcl.Config(arch="vit_tiny", depth=2, img_size=64, query_size=32, out_dim=1024, hidden_dim=256,
                           bottleneck_dim=64)
        return {"figures": [tiny], "ratios": [tiny], "batch_size": 4, "pairs": 2, "warmup": 1, "images": 4}
    if device.type == "cuda":
        return {"figures": [pqcl.Config(arch="vit_small"), pqcl.Config(arch="vit_base")],
                "ratios": [pqcl.Config(arch="vit_small")], "batch_size": 64, "pairs": 10, "warmup": 3, "images": 64}
    return {"figures": [pqcl.Config(arch="vit_small"), pqcl.Config(arch="vit_tiny")],
            "ratios": [pqcl.Config(arch="vit_tiny")], "batch_size": 8, "pairs": 5, "warmup": 1, "images": 48}


def cpu_flags():
    """The CPU's name and the flags that decide bf16 speed."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return {"model": platform.processor()}
    flags = re.search(r"^flags\s*:(.*)$", info, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    return {"model": model.group(1) if model else platform.processor(),
            **{flag: flag in flags for flag in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")}}


def run(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = plan(device, args.quick)
    pairs, batch_size, warmup = args.pairs or setup["pairs"], setup["batch_size"], setup["warmup"]
    precision = "bf16" if device.type == "cuda" else "fp32"  # the step's own: fp32 is faster on this CPU
    results = {"meta": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "quick": args.quick, "pairs": pairs,
                        "batch_size": batch_size,
                        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_flags()},
               "figures": {}, "ratios": {}, "matmul_gflops": {}}
    started = time.perf_counter()
    trainers = {}  # label -> Trainer; a variant measured in several sections keeps its steps
    built = []  # labels in the order built: the table's order
    batches = {}

    def trainer(variant):
        if variant.label not in trainers:
            print(f"  building {variant.label}", flush=True)
            trainers[variant.label] = Trainer(variant, device, warmup)
            built.append(variant.label)
        return trainers[variant.label]

    def batch_for(cfg):
        def get(i):
            if (cfg.img_size, i) not in batches:
                batches[cfg.img_size, i] = synthetic_batch(cfg, batch_size, seed=i, device=device)
            return batches[cfg.img_size, i]
        return get

    def interleave(name, a, b):  # -> step times of a, of b
        print(f"{name}: {pairs} interleaved pairs of {a.label} | {b.label}", flush=True)
        return run_interleaved([trainer(a), trainer(b)], batch_for(a.cfg), pairs)

    def peaks(variant):  # resident tensors + the step's measured peak, over the last `pairs` steps
        t = trainer(variant)
        measured = [m for m in t.step_bytes[-pairs:] if m is not None]
        return [tensor_bytes(t.model, t.optimizer) + m for m in measured] if len(measured) == pairs else None

    def fast_vs_naive(fast):
        naive = replace(fast, naive=True)
        times_fast, times_naive = interleave("fast vs naive", fast, naive)
        name = f"fast vs naive ({ARCH_NAMES[fast.cfg.arch]})"
        results["ratios"][f"{name}: speed-up"] = {"variants": [naive.label, fast.label],
                                                  **ratio(times_naive, times_fast)}
        peak_fast, peak_naive = peaks(fast), peaks(naive)
        if peak_fast and peak_naive:
            results["ratios"][f"{name}: peak memory"] = {"variants": [fast.label, naive.label],
                                                         **ratio(peak_fast, peak_naive)}

    def method_cost(pqcl_variant):
        ibot = replace(pqcl_variant, cfg=replace(pqcl_variant.cfg, query_weight=0.0))
        times_pqcl, times_ibot = interleave("PQCL-iBOT vs iBOT", pqcl_variant, ibot)
        results["ratios"][f"PQCL-iBOT vs iBOT ({ARCH_NAMES[ibot.cfg.arch]}): cost"] = {
            "variants": [pqcl_variant.label, ibot.label], **ratio(times_pqcl, times_ibot)}

    def retire(everything):  # store the figures of trainers done with, and free their memory
        for label, t in list(trainers.items()):
            if everything or t.variant.cfg not in setup["ratios"]:
                del trainers[label]
                if t.times:
                    results["figures"][label] = t.figures(args.peak_tflops)

    # 1. every configuration: on the CPU the fast path against the naive one, and on the
    #    recipe's model the cost of the method, fp32; on a GPU the production setting, bf16
    #    and compiled, timed alone
    for cfg in setup["figures"]:
        fast = Variant(cfg, batch_size, precision, compiled=device.type == "cuda" and not args.no_compile)
        if device.type == "cuda":
            print(f"figures: {fast.label}", flush=True)
            run_interleaved([trainer(fast)], batch_for(cfg), max(pairs, 5))
        else:
            fast_vs_naive(fast)
            if cfg is setup["figures"][0]:
                method_cost(fast)
        retire(everything=False)  # the ratios' configuration stays
    # 2. the other ratios, on one configuration, eager
    for cfg in setup["ratios"]:
        base = Variant(cfg, batch_size, precision)
        if device.type == "cuda":
            fast_vs_naive(base)
            method_cost(base)
        for dtype in ("float32", "bfloat16"):
            results["matmul_gflops"][dtype] = matmul_speed(getattr(torch, dtype), device)
        matmul_ratio = results["matmul_gflops"]["bfloat16"] / results["matmul_gflops"]["float32"]
        if matmul_ratio < EMULATED_BF16 and not args.quick:  # its steps would take most of the run
            results["ratios"]["bf16 vs fp32: speed-up"] = {
                "skipped": f"bf16 matmul {matmul_ratio:.2f}x fp32: emulated on this CPU"}
        else:
            fp32, bf16 = replace(base, precision="fp32"), replace(base, precision="bf16")
            times_fp32, times_bf16 = interleave("bf16 vs fp32", fp32, bf16)
            results["ratios"]["bf16 vs fp32: speed-up"] = {"variants": [fp32.label, bf16.label],
                                                           **ratio(times_fp32, times_bf16)}
            if device.type == "cpu":  # train_ddp's bf16 runs take the matmuls where its probe finds them faster
                bf16_matmul = replace(bf16, matmul_attention=True)
                times_bf16, times_matmul = interleave("attention matmul vs SDPA", bf16, bf16_matmul)
                results["ratios"]["bf16 step, attention matmul vs SDPA: speed-up"] = {
                    "variants": [bf16.label, bf16_matmul.label], **ratio(times_bf16, times_matmul)}
        name = "compile vs eager: speed-up"
        compiled = replace(base, compiled=True)
        if args.no_compile or args.quick:
            results["ratios"][name] = {"skipped": "--quick" if args.quick else "--no-compile"}
        else:
            try:
                times_eager, times_compiled = interleave("compile vs eager", base, compiled)
                results["ratios"][name] = {"variants": [base.label, compiled.label],
                                           **ratio(times_eager, times_compiled)}
            except Exception as error:  # report it; the other figures stand
                results["ratios"][name] = {"error": f"{type(error).__name__}: {error}"[:300]}
                trainers.pop(compiled.label, None)
        retire(everything=True)
    results["figures"] = {label: results["figures"][label] for label in built if label in results["figures"]}
    # 3. the data pipeline, and how many workers keep each configuration fed
    cfg = setup["figures"][0]
    print(f"data: {setup['images']} JPEGs of 500x375 through ImageFiles + PQCLAugmentation at {cfg.img_size} px, "
          "one worker", flush=True)
    data = results["data"] = augmentation_throughput(cfg, setup["images"], device, batch_size)
    data["workers_to_feed"] = {}
    for label, f in results["figures"].items():
        if f["naive"] or f["query_weight"] == 0 or f["precision"] != precision or f["compiled"] != (
                device.type == "cuda" and not args.no_compile):  # the production setting only
            continue
        rates = {label: f["images_per_s"]}
        if device.type == "cpu" and not args.quick:  # FLOPs per image at the GPU's rate
            rates[f"{label} on a GPU, estimated"] = GPU_TFLOPS * 1e3 * GPU_MFU / (f["gflop_per_step"] / batch_size)
        for name, images_per_s in rates.items():
            data["workers_to_feed"][name] = {
                "images_per_s": images_per_s, "workers": math.ceil(images_per_s / data["images_per_s_per_worker"]),
                "device_path_workers": math.ceil(images_per_s / data["device_worker_samples_per_s"])}
    results["meta"]["seconds"] = time.perf_counter() - started
    return results


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _target(name):
    for key, target in TARGETS.items():
        head, _, tail = key.partition(": ")
        if name.startswith(head) and name.endswith(tail):
            return target
    return (None, None)


def _mb(value):
    return f"{value:8.0f}" if value is not None else f"{'n/a':>8}"


def report(results):
    """The figures and ratios as tables."""
    meta, hardware = results["meta"], results["meta"]["hardware"]
    if isinstance(hardware, dict):  # a CPU
        hardware = (f"{hardware.get('model', 'CPU')}, {meta['threads']} threads, "
                    f"avx512_bf16 {'yes' if hardware.get('avx512_bf16') else 'no'}, "
                    f"AMX {'yes' if hardware.get('amx_bf16') else 'no'}, OMP_WAIT_POLICY={meta['omp_wait_policy']}")
    lines = [f"PQCL training step on {meta['device']} ({hardware}), torch {meta['torch']}",
             f"batch {meta['batch_size']}, 2 global views + 1 query crop of 96 px, iBOT masks; "
             "median s/step after warm-up", ""]
    has_mfu = any("mfu" in f for f in results["figures"].values())
    header = (f"{'variant':<62} {'s/step':>7} {'img/s':>7} {'GFLOP':>6} {'TFLOP/s':>7}" + ("    MFU" if has_mfu else "")
              + f" {'step MB':>8} {'peak MB':>8} {'steps':>5}")
    lines += [header, "-" * len(header)]
    for f in results["figures"].values():
        lines.append(f"{f['label']:<62} {f['s_per_step']:7.3f} {f['images_per_s']:7.2f} {f['gflop_per_step']:6.0f} "
                     f"{f['tflops']:7.3f}" + (f" {100 * f['mfu']:5.1f}%" if has_mfu else "")
                     + f" {_mb(f['step_mb'])} {_mb(f['peak_mb'])} {f['steps']:5d}"
                     + (f"  (compiling: {f['compile_s']:.0f} s)" if "compile_s" in f else ""))
    lines += ["step MB: what the step adds at its peak; peak MB: that plus weights, buffers and AdamW state", "",
              f"{'ratio (median of per-pair ratios)':<46} {'measured':>9} {'pair range':>12} {'target':>8}  verdict",
              "-" * 90]
    for name, r in results["ratios"].items():
        if "median" not in r:
            outcome = f"skipped ({r['skipped']})" if "skipped" in r else f"failed: {r['error']}"
            lines.append(f"{name:<46} {'-':>9} {'':>12} {'':>8}  {outcome}")
            continue
        relation, target = _target(name)
        verdict = target_text = ""
        if target is not None and not meta["quick"]:  # the targets are for the default configurations
            verdict = "met" if (r["median"] >= target if relation == ">=" else r["median"] <= target) else "missed"
            target_text = f"{relation} {target}"
        lines.append(f"{name:<46} {r['median']:8.2f}x {r['min']:5.2f}-{r['max']:<5.2f}x {target_text:>8}  {verdict}")
    if results["matmul_gflops"]:
        lines.append("one matmul (1024x384 @ 384x1536): " + ", ".join(
            f"{dtype} {gflops:.0f} GFLOP/s" for dtype, gflops in results["matmul_gflops"].items()))
    data = results["data"]
    before_after, draft = data["before / after"], data["draft (2000x1500)"]
    device_worker, photometric = data["device worker"], data["photometric"]
    lines += ["", f"data: one worker (one thread) augments {data['images_per_s_per_worker']:.1f} samples/s "
                  f"({data['ms_per_image']:.0f} ms each: decode of a {data['jpeg_kb']:.0f} kB 500x375 JPEG, "
                  "2 global views, query crop, masks)",
              f"  before (exact blur, full decode) {before_after['before_samples_per_s']:.1f} samples/s, after "
              f"{before_after['after_samples_per_s']:.1f}: {before_after['speed-up']['median']:.2f}x "
              f"(pairs {before_after['speed-up']['min']:.2f}-{before_after['speed-up']['max']:.2f}x)",
              f"  drafted decoding alone, 2000x1500 JPEGs: {draft['full decode_samples_per_s']:.1f} -> "
              f"{draft['drafted_samples_per_s']:.1f} samples/s, {draft['speed-up']['median']:.2f}x",
              f"  device path (--augment-on device): the worker's share (decode, geometry, parameter draws) "
              f"{data['device_worker_samples_per_s']:.1f} samples/s, {device_worker['speed-up']['median']:.2f}x the "
              f"CPU path's (pairs {device_worker['speed-up']['min']:.2f}-{device_worker['speed-up']['max']:.2f}x); "
              f"the batched photometric stage on {photometric['device']}: {photometric['samples_per_s']:.0f} "
              f"samples/s ({photometric['ms_per_batch']:.1f} ms per batch of {photometric['batch_size']})"]
    for name, feed in data["workers_to_feed"].items():
        lines.append(f"  {name}: {feed['images_per_s']:.1f} images/s -> {feed['workers']} worker(s) on the CPU path, "
                     f"{feed['device_path_workers']} on the device path")
    if any(name.endswith("estimated") for name in data["workers_to_feed"]):
        lines.append(f"  (estimated: the step's FLOPs per image at {100 * GPU_MFU:.0f}% of {GPU_TFLOPS:.0f} TFLOP/s)")
    lines.append(f"\nbench.py took {meta['seconds']:.0f} s")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 pairs, no compile: a smoke run in seconds")
    parser.add_argument("--json", metavar="PATH", help="write every figure to PATH")
    parser.add_argument("--pairs", type=int, default=0, help="interleaved pairs per ratio (0: 5 on CPU, 10 on GPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s at the step's precision, for MFU")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes on a CPU)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench.py: error: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        results = run(args)
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only (main may be called in-process)
    print()
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
