"""Checkpoints: tensors and plain dicts, written atomically, read with weights_only=True.

    checkpoint.pth  the whole training state (student, teacher, centers, optimizer, scaler,
                    config as a dict, the run's data settings, epoch, step, world size):
                    train_ddp.py resumes from it
    checkpoint-epochNNNN.pth  the same after NNNN epochs (train_ddp.py --keep-every)
    backbone.pth    the teacher backbone alone with timm's parameter names (export_backbone)

The resume policy lives here too: which flags may change on a resume (resumed_config), and
what a resumed or restarted run does to the files of the one before (log_until, move_aside).

A reader sees the old file or the new one, never half of one; nothing is unpickled.
"""
import dataclasses
import json
import math
import os
import time

import torch

import pqcl
from data import UsageError

CENTERS = ("center_cls", "center_patch", "center_query")  # the PQCL buffers a checkpoint keeps
RUN_SETTINGS = ("data", "subset", "preset", "augment_on")  # train_ddp.py flags outside pqcl.Config that shape a run
RUN_FILES = ("checkpoint.pth", "log.jsonl", "backbone.pth", "eval.json")  # what one run writes in its folder


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


def save_atomic_text(text, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_atomic_json(obj, path):
    save_atomic_text(json.dumps(obj, indent=1), path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path}: no checkpoint there; check the path (or drop --resume to start afresh)") from None
    except Exception as error:
        raise UsageError(f"{path}: not a readable PQCL checkpoint ({type(error).__name__}); "
                         "pass the checkpoint.pth that train_ddp.py wrote") from None


def training_state(model, optimizer, scaler, run, epoch, step, world_size):
    """What checkpoint.pth holds; `run`: the RUN_SETTINGS it was trained with. Drop path is
    reseeded from (seed, rank, step), so `step` is the RNG state too."""
    return {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
            "centers": {name: getattr(model, name) for name in CENTERS},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "config": dataclasses.asdict(model.cfg), "run": run,
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


def resumed_config(checkpoint, given, world_size, where):
    """The pqcl.Config a resume of `checkpoint` continues with, on `world_size` processes: the
    checkpoint's own, with its epochs raised to a larger --epochs (an extension: the schedules,
    pure functions of the step and the planned length, follow the new length from here on).
    `given` holds the flags typed on the command line, {name: value} of pqcl.Config fields and
    RUN_SETTINGS; one that would change the model, the method, the data or the global batch is
    a UsageError naming the flag, the checkpoint's value and the fix."""
    config, world_size_before = checkpoint["config"], checkpoint["world_size"]
    recorded = {**config, **checkpoint.get("run", {})}  # checkpoints before 2026-12 recorded no run settings
    start_over = f"or pass --fresh to start a new run in {where} (the old one is moved aside)"
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if name == "epochs" and value < config["epochs"]:
            raise UsageError(f"{flag} {value}: the run in {where} plans {config['epochs']} epochs; to stop it "
                             f"earlier pass --max-steps, {start_over}")
        if name not in ("epochs", "batch_size") and name in recorded and value != recorded[name]:
            raise UsageError(f"{flag} {value}: the run in {where} was started with {name} {recorded[name]}; "
                             f"drop {flag} to resume it, {start_over}")
    batch_size = given.get("batch_size", config["batch_size"])
    global_batch = config["batch_size"] * world_size_before
    if batch_size * world_size != global_batch:
        fix = (f"pass --batch-size {global_batch // world_size}" if global_batch % world_size == 0
               else f"run on a number of processes that divides {global_batch}")
        raise UsageError(f"--batch-size {batch_size} x {world_size} processes is a global batch of "
                         f"{batch_size * world_size}, but the run in {where} trained with {config['batch_size']} x "
                         f"{world_size_before} = {global_batch}; {fix} to continue it sample for sample, {start_over}")
    return pqcl.Config(**{**config, "batch_size": batch_size, "epochs": max(config["epochs"], given.get("epochs", 0))})


def log_until(path, step):
    """Drop the records of log.jsonl past `step`, written by a run that died after its last
    checkpoint (and a torn last line): the resumed run logs those steps again, once. Atomic."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        save_atomic_text("".join(kept), path)


def move_aside(output_dir):
    """--fresh: the files of the run in `output_dir` (RUN_FILES and the epoch snapshots) move
    into `output_dir`/previous-<date>-<time>/, never deleted. -> that folder, or None."""
    names = [name for name in os.listdir(output_dir)
             if name in RUN_FILES or (name.startswith("checkpoint-epoch") and name.endswith(".pth"))]
    if not names:
        return None
    aside = os.path.join(output_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    os.makedirs(aside)  # exist_ok=False: never mixes two old runs
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(aside, name))
    return aside


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
