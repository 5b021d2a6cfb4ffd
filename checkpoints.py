"""Checkpoints: tensors and plain dicts, written atomically, read with weights_only=True.

    checkpoint.pth  the whole training state (student, teacher, centers, optimizer, scaler,
                    config as a dict, epoch, step, world size): train_ddp.py resumes from it
    backbone.pth    the teacher backbone alone with timm's parameter names (export_backbone)

A reader sees the old file or the new one, never half of one; nothing is unpickled.
"""
import dataclasses
import json
import math
import os

import torch

import pqcl
from data import UsageError

CENTERS = ("center_cls", "center_patch", "center_query")  # the PQCL buffers a checkpoint keeps


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


def save_atomic_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no checkpoint there; check the path (or drop --resume to start afresh)") from None
    except Exception as error:
        raise UsageError(f"{path}: not a readable PQCL checkpoint ({type(error).__name__}); "
                         "pass the checkpoint.pth that train_ddp.py wrote") from None


def training_state(model, optimizer, scaler, epoch, step, world_size):
    """What checkpoint.pth holds. Drop path is reseeded from (seed, rank, step), so `step` is
    the RNG state too."""
    return {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
            "centers": {name: getattr(model, name) for name in CENTERS},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "config": dataclasses.asdict(model.cfg),
            "epoch": epoch, "step": step, "world_size": world_size}


def restore(model, checkpoint, optimizer=None, scaler=None):
    """Load a training checkpoint into `model` (student, teacher, centers) and, when given,
    into `optimizer` and `scaler`: training's resume and the picture's model."""
    model.student.load_state_dict(checkpoint["student"])
    model.teacher.load_state_dict(checkpoint["teacher"])
    for name, center in checkpoint["centers"].items():
        getattr(model, name).copy_(center)
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scaler is not None and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])


def model_from_checkpoint(path):
    """A checkpoint.pth -> (the PQCL model it holds, the checkpoint)."""
    checkpoint = load_checkpoint(path)
    if not {"student", "teacher", "centers", "config"} <= set(checkpoint):
        raise UsageError(f"{path}: holds no student and teacher (an exported backbone?); "
                         "pass the checkpoint.pth that train_ddp.py wrote")
    model = pqcl.PQCL(pqcl.Config(**checkpoint["config"]))
    restore(model, checkpoint)
    return model, checkpoint


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
    state = backbone_state(checkpoint) if isinstance(checkpoint, dict) else {}
    if not {"pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= set(state):
        raise UsageError(f"{path}: not a PQCL checkpoint or backbone (no ViT weights with timm's names); "
                         "pass the checkpoint.pth or backbone.pth that train_ddp.py wrote")
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
