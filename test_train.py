"""train_ddp.py, data.py and checkpoints.py: DDP against one process, exact resume after
SIGKILL, SIGTERM, atomic checkpoints, export, unreadable images, bad input, the sampler.

    python -m pytest test_train.py -q
"""
import collections
import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, default_collate

import checkpoints
import data
import evaluate
import pqcl
import train_ddp
from test_evaluate import brute_force_knn
from test_pqcl import randomize_, tiny_batch, tiny_pqcl

REPO = os.path.dirname(os.path.abspath(__file__))
TINY_RUN = ["--arch", "vit_tiny", "--depth", "2", "--img-size", "32", "--patch-size", "8", "--query-size", "16",
            "--out-dim", "64", "--hidden-dim", "32", "--bottleneck-dim", "16", "--epochs", "2",
            "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "1", "--lr", "1e-3", "--log-every", "1",
            "--workers", "0", "--no-eval"]


def image_folder(root, num_images=32, corrupt=0):
    """An ImageFolder tree of small random PNGs in two classes, plus `corrupt` unreadable files."""
    rng = np.random.default_rng(0)
    for i in range(num_images):
        os.makedirs(os.path.join(root, f"class{i % 2}"), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(os.path.join(root, f"class{i % 2}", f"{i:03d}.png"))
    for i in range(corrupt):
        with open(os.path.join(root, "class0", f"corrupt{i}.jpg"), "wb") as f:
            f.write(b"\xff\xd8 not really a jpeg")
    return str(root)


TRAIN_DDP = os.path.join(REPO, "train_ddp.py")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: runs may share the cores


def start_cli(args, **kwargs):
    """`python train_ddp.py ARGS` as a child process (subprocess.Popen)."""
    return subprocess.Popen([sys.executable, TRAIN_DDP, *args], cwd=REPO, env=CHILD_ENV, **kwargs)


def run_cli(args):
    """`python train_ddp.py ARGS` to its end: CompletedProcess with text stdout and stderr."""
    return subprocess.run([sys.executable, TRAIN_DDP, *args], capture_output=True, text=True, cwd=REPO, env=CHILD_ENV)


def torchrun_command(args, processes=2, max_restarts=0):
    """`torchrun --standalone --nproc-per-node PROCESSES train_ddp.py ARGS` (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "--max-restarts", str(max_restarts), TRAIN_DDP, *args]


def run_torchrun(args, processes=2):
    result = subprocess.run(torchrun_command(args, processes), capture_output=True, text=True, cwd=REPO, env=CHILD_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(output_dir):
    return torch.load(os.path.join(output_dir, "checkpoint.pth"), weights_only=True)


def assert_states_close(a, b, atol, rtol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=rtol, msg=name)


# Runs compared with each other must move the weights far more than the comparison's
# tolerance: a peak lr of 0.5 x batch / 256 (AdamW moves each weight by about that per step)
# and a teacher that goes half-way to the student every step move every tensor by 1e-3 to
# 1e-2 in a few steps, where the recipe's lr and momentum 0.996 moved the teacher by 1e-7.
MOVING = ["--lr", "0.5", "--momentum-teacher", "0.5"]
# For runs on different process counts compared to fp32 tolerances: on a CPU with fast bf16
# `--precision auto` takes bf16, whose rounding turns the other order of the gradient sums into
# differences of 1e-3 (seen on a Zen 5 EPYC), not 1e-6.
FP32 = ["--precision", "fp32"]


def initial_state(checkpoint):
    """The student, teacher and centers the run of `checkpoint` started from (train_ddp.py
    seeds the model with the config's seed)."""
    cfg = pqcl.Config(**checkpoint["config"])
    torch.manual_seed(cfg.seed)
    model = pqcl.PQCL(cfg)
    return {"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
            "centers": {name: getattr(model, name) for name in checkpoint["centers"]}}


def assert_moved(start, end, far_beyond):
    """Every tensor but the fixed positions and the last layer (frozen in the first epoch)
    changed by more than `far_beyond` somewhere."""
    assert start.keys() == end.keys()
    for name in end:
        if not name.endswith("pos_embed") and ".last_layer." not in name:
            assert (end[name] - start[name]).abs().max() > far_beyond, name


def without_key_bias(state):
    """The state with the key third of each qkv bias zeroed. Attention ignores the key bias (it
    adds the same q.b to all scores of a query), so its gradient is rounding noise, which AdamW's
    g / (|g| + eps) turns into steps of the full lr that differ with the order of summation."""
    state = dict(state)
    for name, value in state.items():
        if name.endswith("attn.qkv.bias"):
            dim = len(value) // 3
            state[name] = torch.cat([value[:dim], torch.zeros(dim), value[2 * dim:]])
    return state


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


# a tiny model whose schedules all move within 8 steps: 2 steps per epoch, warm-ups of 2 epochs
STEP_CONFIG = dict(drop_path_rate=0.0, epochs=4, warmup_epochs=2, warmup_teacher_temp_epochs=2, lr=0.2,
                   batch_size=256, weight_decay=0.1, weight_decay_end=0.5, momentum_teacher=0.9)
STEPS_PER_EPOCH = 2


def expected_schedule(step):
    """STEP_CONFIG's values at `step`, by the recipe's formulas: lr warms up linearly to
    0.2 x 256 / 256 over 4 steps, weight decay and teacher momentum follow a cosine over the 8
    steps, the teacher temperature warms up 0.04 -> 0.07 over 4 steps, and the head's last
    layer stays frozen during the first epoch (2 steps)."""
    cosine = 0.5 * (1 + math.cos(math.pi * step / 8))  # 1 at step 0, 0 at step 8
    return {"lr": 0.2 * step / 4, "weight_decay": 0.5 + (0.1 - 0.5) * cosine, "momentum": 1 + (0.9 - 1) * cosine,
            "teacher_temp": 0.04 + 0.03 * step / 4, "freeze_last_layer": step < 2}


def reference_step(model, batch, schedule, clip=3.0, betas=(0.9, 0.999), eps=1e-8):
    """One DINO/iBOT step written out on a fresh model: the loss at the schedule's teacher
    temperature, each gradient tensor clipped to norm `clip` on its own (0: not clipped), the head's last
    layer left out while frozen, then AdamW's first step by hand (decoupled decay
    p (1 - lr wd), none on biases and norms; update lr m^ / (sqrt(v^) + eps) = lr g / (|g| + eps)),
    then the EMA teacher. Changes `model` in place; returns the loss and the gradients fed."""
    out = model(batch, teacher_temp=schedule["teacher_temp"])
    out["loss"].backward()
    fed = {}
    with torch.no_grad():
        for name, p in model.student.named_parameters():
            if not p.requires_grad:
                continue
            if schedule["freeze_last_layer"] and ".last_layer." in name:
                fed[name] = None  # frozen: AdamW gets no gradient
                continue
            fed[name] = p.grad * (min(1.0, clip / (p.grad.norm().item() + 1e-6)) if clip else 1.0)
            module = name.split(".")[-2]
            decay = 0.0 if name.endswith(".bias") or module.startswith("norm") else schedule["weight_decay"]
            first_moment, second_moment = (1 - betas[0]) * fed[name], (1 - betas[1]) * fed[name] ** 2
            update = (first_moment / (1 - betas[0])) / ((second_moment / (1 - betas[1])).sqrt() + eps)
            p.mul_(1 - schedule["lr"] * decay).sub_(schedule["lr"] * update)
        student = dict(model.student.named_parameters())
        for name, t in model.teacher.named_parameters():
            t.copy_(schedule["momentum"] * t + (1 - schedule["momentum"]) * student[name])
    return out["loss"].detach(), fed


@pytest.mark.parametrize("step, clip", [(1, 3.0), (3, 3.0), (3, 0.0)])
def test_train_step_is_the_reference_step(step, clip):
    """train_step with schedule_at's values equals the reference step on a tiny model (student
    randomised, so the teacher differs and some gradients exceed the clip while others do
    not): the schedule at that step, the gradients handed to AdamW (clipped per tensor, or
    not at all with --clip-grad 0 as in DINO; no last layer at step 1, the first epoch), the
    student after the step (no decay on biases and norms) and the EMA teacher."""
    model = randomize_(tiny_pqcl(**STEP_CONFIG, clip_grad=clip).train(), seed=2)
    batch = tiny_batch(model.cfg)
    schedule = train_ddp.schedule_at(model.cfg, step, STEPS_PER_EPOCH)
    assert schedule.keys() == expected_schedule(step).keys()
    assert schedule == pytest.approx(expected_schedule(step), rel=1e-12)
    reference = copy.deepcopy(model)
    expected_loss, expected_fed = reference_step(reference, batch, expected_schedule(step), clip)

    optimizer = train_ddp.make_optimizer(model, torch.device("cpu"))
    fed = {}
    names = {p: name for name, p in model.student.named_parameters()}
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: fed.update(
        {names[p]: None if p.grad is None else p.grad.clone() for group in opt.param_groups for p in group["params"]}))
    terms = train_ddp.train_step(model, optimizer, batch, schedule)

    torch.testing.assert_close(terms["loss"], expected_loss, atol=0, rtol=0)
    assert fed.keys() == expected_fed.keys()
    raw_norms = [p.grad.norm().item() for p in reference.student.parameters() if p.grad is not None]
    assert min(raw_norms) < 3.0 < max(raw_norms)  # so the clip matters, and not everywhere
    assert any(".last_layer." in name for name in fed)
    for name, grad in fed.items():
        assert (grad is None) == (expected_fed[name] is None), name
        if grad is not None:
            torch.testing.assert_close(grad, expected_fed[name], atol=1e-7, rtol=1e-6, msg=name)
    for part in ("student", "teacher"):
        expected = dict(getattr(reference, part).named_parameters())
        for name, p in getattr(model, part).named_parameters():
            torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=1e-6, msg=f"{part}.{name}")


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tiny_images, tmp_path):
    """torchrun, 2 gloo processes x batch 4 == 1 process x batch 8: same logged losses every
    step and the same student, teacher and centers (no drop path, so no per-rank randomness):
    within 2e-6, where the 3 steps moved every tensor by more than 1000 times that (MOVING).
    Only the key bias, whose gradient is noise (without_key_bias), is left out."""
    common = [*TINY_RUN, *MOVING, "--data", tiny_images, "--max-steps", "3", "--drop-path-rate", "0", *FP32]
    single = run_cli([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    run_torchrun([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")])
    one_log, two_log = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in one_log] == [r["step"] for r in two_log] == [1, 2, 3]
    for a, b in zip(one_log, two_log):
        for term in ("loss", "cls", "patch", "query"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-5), (a["step"], term)
    one, two = load(tmp_path / "one"), load(tmp_path / "two")
    assert two["world_size"] == 2 and one["step"] == two["step"] == 3
    start = initial_state(one)
    for part in ("student", "teacher", "centers"):
        assert_moved(start[part], one[part], far_beyond=1000 * 2e-6)
        assert_states_close(without_key_bias(one[part]), without_key_bias(two[part]), atol=2e-6)


def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(tiny_images, tmp_path):
    """A run killed with SIGKILL after its first checkpoint and continued with --resume ends
    with the same student, teacher and centers (atol 1e-6) as an uninterrupted run of the same
    seed, where the run moved every tensor by more than 1000 times that (MOVING), also after
    the checkpoint the kill left behind; that checkpoint is whole (it loads, and holds a
    completed step)."""
    common = [*TINY_RUN, *MOVING, "--data", tiny_images, "--max-steps", "8", "--ckpt-every", "2",
              "--batch-size", "4", "--drop-path-rate", "0.2"]
    whole = run_cli([*common, "--output-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    killed_dir = tmp_path / "killed"
    process = start_cli([*common, "--output-dir", str(killed_dir)], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed_dir / "checkpoint.pth").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted = load(killed_dir)
    interrupted_at = interrupted["step"]
    assert 2 <= interrupted_at < 8
    resumed = run_cli([*common, "--output-dir", str(killed_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {interrupted_at}" in resumed.stdout
    final, reference = load(killed_dir), load(tmp_path / "whole")
    assert final["step"] == reference["step"] == 8
    for part in ("student", "teacher", "centers"):
        assert_moved(interrupted[part], reference[part], far_beyond=1000 * 1e-6)
        assert_states_close(final[part], reference[part], atol=1e-6)


@pytest.mark.parametrize("whole_group", [False, True], ids=["main-process", "process-group-with-a-worker"])
def test_sigterm_saves_and_exits_cleanly(tiny_images, tmp_path, whole_group):
    """SIGTERM (preemption): the run writes a checkpoint at a completed step and exits 0, also when
    the signal reaches its data workers too (a scheduler signalling the process group, as SLURM does)."""
    args = [*TINY_RUN, "--data", tiny_images, "--epochs", "50", "--batch-size", "4", "--ckpt-every", "1000",
            "--output-dir", str(tmp_path), *(["--workers", "1"] if whole_group else [])]
    process = start_cli(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    if whole_group:
        os.killpg(process.pid, signal.SIGTERM)  # the new session's group: the run and its worker
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    checkpoint = load(tmp_path)
    assert 1 <= checkpoint["step"] < 50 * 8 and checkpoint["step"] == read_log(tmp_path)[-1]["step"]
    deadline = time.time() + 30
    while group_alive(process.pid) and time.time() < deadline:  # the worker that ignored SIGTERM ended too
        time.sleep(0.1)
    assert not group_alive(process.pid)


def group_alive(group_id):
    try:
        os.killpg(group_id, 0)
        return True
    except ProcessLookupError:
        return False


def test_atomic_save_never_leaves_a_half_written_checkpoint(tmp_path, monkeypatch):
    """A save that dies midway leaves the previous checkpoint byte for byte."""
    path = str(tmp_path / "checkpoint.pth")
    checkpoints.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    before = open(path, "rb").read()

    def dies_midway(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError):
        checkpoints.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert open(path, "rb").read() == before
    assert torch.load(path, weights_only=True)["step"] == 1


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_images, tmp_path, monkeypatch, capsys):
    """A loss that turns NaN after step 2 stops the run with exit status 1 and a message;
    the checkpoint of step 2 stays as it was, with finite weights."""
    forward = pqcl.PQCL.forward
    calls = []

    def nan_from_step_3(self, batch, teacher_temp=None, monitor=False):
        out = forward(self, batch, teacher_temp, monitor)
        calls.append(1)
        return {k: v * float("nan") for k, v in out.items()} if len(calls) >= 3 else out

    monkeypatch.setattr(pqcl.PQCL, "forward", nan_from_step_3)
    status = train_ddp.main([*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "6",
                             "--ckpt-every", "2", "--output-dir", str(tmp_path)])
    assert status == 1
    assert "non-finite loss" in capsys.readouterr().err
    checkpoint = load(tmp_path)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["student"].values())


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, capsys):
    """Unreadable files inside the dataset are replaced by readable ones, counted in the log and
    reported; training goes on."""
    folder = image_folder(tmp_path / "data", num_images=8, corrupt=2)
    status = train_ddp.main([*TINY_RUN, "--data", folder, "--batch-size", "10", "--max-steps", "2",
                             "--output-dir", str(tmp_path / "run")])
    assert status == 0
    captured = capsys.readouterr()
    assert "skipping unreadable image" in captured.err and "corrupt" in captured.err
    assert read_log(tmp_path / "run")[-1]["skipped_images"] >= 2
    assert "unreadable images" in captured.out


def test_exported_backbone_loads_strictly_with_timm_names(tiny_images, tmp_path):
    """backbone.pth: the teacher backbone with timm's names (no prefix, no mask_token), which
    loads strictly into pqcl.VisionTransformer and computes what the teacher computes; the
    --export command writes the same file."""
    run_dir = tmp_path / "run"
    assert train_ddp.main([*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "2",
                           "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "backbone.pth", weights_only=True)
    assert "mask_token" not in state and not any(k.startswith(("backbone.", "teacher.")) for k in state)
    backbone = pqcl.build_backbone("vit_tiny", depth=2, img_size=32, patch_size=8)
    backbone.load_state_dict(state, strict=True)
    teacher = pqcl.build_backbone("vit_tiny", depth=2, img_size=32, patch_size=8)
    teacher.load_state_dict({k.removeprefix("backbone."): v for k, v in load(run_dir)["teacher"].items()
                             if k.startswith("backbone.")})
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.eval()(images), teacher.eval()(images), atol=0, rtol=0)
    assert train_ddp.main(["--export", str(run_dir / "checkpoint.pth"), str(tmp_path / "again.pth")]) == 0
    assert_states_close(torch.load(tmp_path / "again.pth", weights_only=True), state, atol=0)


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "no such folder"),
    (["--data", "{empty}"], "holds no images"),
    (["--arch", "vit_gigantic"], "unknown architecture"),
    (["--img-size", "30"], "--img-size: 30 is not a multiple of patch_size"),
    (["--query-weight", "1", "--num-queries", "0"], "--num-queries"),
    (["--framework", "mae"], "unknown framework"),
    (["--mask-ratio-vars", "0.1", "0.2"], "--mask-ratios"),
    (["--precision", "fp16"], "needs a GPU"),
    (["--resume"], "holds no checkpoint"),
    (["--resume", "--fresh"], "pass one of them"),
    (["--data", "{images}", "--keep-every", "-1"], "--keep-every -1"),
    (["--data", "{images}", "--batch-size", "1000"], "lower --batch-size"),
    (["--export", "/no/such.pth", "{out}/b.pth"], "no checkpoint there"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_images, capsys, args, message):
    """Bad input: one line on stderr naming the problem and the fix, exit status 2, and the
    output folder is not created."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    args = [a.format(empty=tmp_path / "empty", out=out, images=tiny_images) for a in args]
    assert train_ddp.main(["--output-dir", str(out), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_bad_input_on_the_command_line_has_no_traceback(tmp_path):
    """The real process: exit status 2 and a single line, no traceback."""
    result = run_cli(["--output-dir", str(tmp_path / "out"), "--data", str(tmp_path / "missing")])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_default_run_shortened_end_to_end(tmp_path, capsys):
    """`python train_ddp.py --max-steps 3` (the embedded set cut to 128 + 48 images, the weights
    moved from their start by a large lr and a fast teacher; MOVING's lr 0.5 collapses the
    features to cosines above 0.999, where the k-NN's ranks tie): the embedded default runs, logs and exports, and
    eval.json's two k-NN figures are the cosine k-NN (k = 20, T = 0.07) recomputed by brute
    force on the test split, from the exported backbone.pth and from the initialisation of the
    run's seed, whose predictions differ (so the two figures cannot be swapped unseen)."""
    with mock.patch.multiple(data, EMBEDDED_TRAIN=128, EMBEDDED_TEST=48):
        assert train_ddp.main(["--max-steps", "3", "--lr", "0.05", "--momentum-teacher", "0.5",
                               "--output-dir", str(tmp_path)]) == 0
        (train_images, train_labels, _), (test_images, test_labels, _) = data.embedded_splits(0, 32)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert (tmp_path / "backbone.pth").exists() and read_log(tmp_path)[-1]["step"] == 3
    assert "k-NN top-1" in capsys.readouterr().out
    assert (result["k"], result["temperature"], result["train_images"], result["test_images"]) == (20, 0.07, 128, 48)
    trained = pqcl.build_backbone("vit_tiny", depth=4, img_size=32, patch_size=4)
    trained.load_state_dict(torch.load(tmp_path / "backbone.pth", weights_only=True))
    initial = pqcl.build_backbone("vit_tiny", depth=4, img_size=32, patch_size=4)
    initial.load_state_dict({k.removeprefix("backbone."): v for k, v in initial_state(load(tmp_path))["teacher"].items()
                             if k.startswith("backbone.")})
    predictions = {}
    for name, backbone in (("knn_top1", trained), ("knn_top1_random_init", initial)):
        train_features, test_features = (evaluate.backbone_features(backbone.eval(), images, keep_patches=False)["image"]
                                         for images in (train_images, test_images))
        predictions[name] = brute_force_knn(train_features, train_labels, test_features, 20, 0.07)
        assert result[name] == pytest.approx(100 * (predictions[name] == test_labels).double().mean().item(),
                                             abs=1e-9), name
    assert (predictions["knn_top1"] != predictions["knn_top1_random_init"]).any()


def test_resumable_sampler_deals_whole_global_batches():
    """Ranks get disjoint samples whose union per step is the single-process batch, and a
    sampler started at step k yields exactly the tail of the full order."""
    full = list(data.ResumableSampler(50, 4, seed=3))
    ranks = [list(data.ResumableSampler(50, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    for step in range(len(full) // 4):
        assert sorted(full[4 * step: 4 * step + 4]) == sorted(ranks[0][2 * step: 2 * step + 2] + ranks[1][2 * step: 2 * step + 2])
    later = data.ResumableSampler(50, 4, seed=3)
    later.set_position(0, 5)
    assert list(later) == full[20:] and len(later) == len(full) - 20


@pytest.mark.parametrize("bf16_seconds,matmul_attention_seconds,expected,expected_attention", [
    (0.5, 0.5, torch.bfloat16, pqcl.matmul_attention), (0.5, 2.0, torch.bfloat16, F.scaled_dot_product_attention),
    (2.0, 0.5, None, F.scaled_dot_product_attention)])
def test_auto_precision_and_attention_follow_their_probes(tiny_images, tmp_path, capsys, bf16_seconds,
                                                          matmul_attention_seconds, expected, expected_attention):
    """--precision auto on a CPU: bf16 where the probe's bf16 matmul is faster than fp32, and
    the run then trains under bf16 autocast; fp32 (no autocast) where bf16 is slower, as on a
    CPU without native bf16. Attention (every pqcl.Attention of student and teacher) is
    pqcl.matmul_attention in a bf16 run where the attention probe finds it faster than SDPA,
    else SDPA; an fp32 run never probes it. The start line names both choices."""
    used, attention_probes = [], []
    step = train_ddp.train_step
    timings = {torch.float32: 1.0, torch.bfloat16: bf16_seconds}

    def attention_seconds(heads, head_dim, tokens):
        attention_probes.append((heads, head_dim, tokens))
        return {"sdpa": 1.0, "matmul": matmul_attention_seconds}

    def recording_step(*args, **kwargs):
        attends = {m.attend for m in args[0].modules() if isinstance(m, pqcl.Attention)}
        used.append((args[4], attends))
        return step(*args, **kwargs)

    with mock.patch.object(train_ddp, "matmul_seconds", lambda width, dtypes: {d: timings[d] for d in dtypes}), \
         mock.patch.object(train_ddp, "attention_seconds", attention_seconds), \
         mock.patch.object(train_ddp, "train_step", recording_step):
        assert train_ddp.main([*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "2",
                               "--output-dir", str(tmp_path)]) == 0
    assert used == [(expected, {expected_attention})] * 2
    out = capsys.readouterr().out
    assert f"{'bf16' if expected else 'fp32'} (bf16 matmul {1.0 / bf16_seconds:.2f}x fp32" in out
    if expected is None:
        assert attention_probes == [] and "attention" not in out.splitlines()[0]
    else:
        width, _, heads = pqcl.ARCHS["vit_tiny"]
        assert attention_probes == [(heads, width // heads, 1 + (32 // 8) ** 2)]  # TINY_RUN's sequence
        assert (f"attention as two matmuls, {1 / matmul_attention_seconds:.2f}x SDPA"
                if expected_attention is pqcl.matmul_attention else
                f"attention by SDPA, {matmul_attention_seconds:.2f}x the matmuls") in out


def test_attention_probe_is_quick_and_valid():
    """The real attention probe answers at the recipe's ViT-S/16 sequence in well under a second."""
    start = time.perf_counter()
    attend, why = train_ddp.cpu_attention(pqcl.Config())
    assert attend in (pqcl.matmul_attention, F.scaled_dot_product_attention)
    assert why.startswith("attention ") and time.perf_counter() - start < 5


def test_matmul_probe_keeps_its_answer_when_another_process_takes_the_core():
    """A busy core only adds time: stalls of 0.2 s on most of one dtype's matmuls (another
    process taking the core, here on bf16 as in the start-up beside a git commit) leave that
    dtype's figure at a stall-free timing, below the stall. It times on one thread (a busy core
    stalls every multi-threaded matmul at its barrier) and gives the run its threads back."""
    mm, calls, threads = torch.mm, collections.Counter(), torch.get_num_threads()

    def stalled_on_bf16(a, b):
        assert torch.get_num_threads() == 1
        calls[a.dtype] += 1
        if a.dtype == torch.bfloat16 and calls[a.dtype] % 4 != 0:
            time.sleep(0.2)
        return mm(a, b)

    with mock.patch.object(torch, "mm", stalled_on_bf16):
        seconds = train_ddp.matmul_seconds(384, (torch.float32, torch.bfloat16))
    assert calls[torch.bfloat16] == calls[torch.float32] >= 6  # warm-up and 5 turns each, alternated
    assert seconds[torch.bfloat16] < 0.2 and seconds[torch.float32] < 0.2
    assert torch.get_num_threads() == threads


def test_auto_precision_probe_is_quick_and_valid():
    """The real probe answers fp32 or bf16 in well under a second at ViT-S width."""
    start = time.perf_counter()
    precision, why = train_ddp.auto_precision(torch.device("cpu"), 384)
    assert precision in ("fp32", "bf16") and "bf16 matmul" in why and time.perf_counter() - start < 5


def test_collapse_monitors_are_logged_at_log_steps_only(tiny_images, tmp_path):
    """Every log.jsonl record has H(t) and KL of each term and the teacher's effective rank
    (between 1 and the number of [CLS] embeddings); the step computes them on log steps only."""
    flags = []
    step = train_ddp.train_step
    with mock.patch.object(train_ddp, "train_step", lambda *a, **k: flags.append(k["monitor"]) or step(*a, **k)):
        assert train_ddp.main([*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "5",
                               "--log-every", "2", "--output-dir", str(tmp_path)]) == 0
    assert flags == [False, True, False, True, True]  # steps 2 and 4 by --log-every, 5 the last
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5]
    for record in records:
        for term in ("cls", "patch", "query"):
            assert 0 <= record[f"entropy_{term}"] <= math.log(64) + 1e-4 and record[f"kl_{term}"] >= -1e-4
        assert 1 <= record["effective_rank"] <= 2 * 4


def test_data_wait_counts_the_loader_not_the_step():
    """DataWait adds the time spent blocked on each batch (here a loader that sleeps 20 ms per
    batch) and not the time the loop spends on it (100 ms per batch): at least the loader's
    sleeps, well below the loop's; take() returns the sum once."""
    def slow_loader():
        for item in range(3):
            time.sleep(0.02)
            yield item

    waiting = train_ddp.DataWait()
    items = []
    for item in waiting.batches(slow_loader()):
        items.append(item)
        time.sleep(0.1)
    assert items == [0, 1, 2]
    waited = waiting.take()
    assert 0.06 <= waited < 0.3 and waiting.take() == 0.0


def test_data_wait_is_logged(tiny_images, tmp_path):
    """A loader slower than the step shows in log.jsonl: data_wait_s per step is at least the
    dataset's sleep for a batch and at most the step time."""
    read = data.ImageFiles.__getitem__

    def slow_read(self, index):
        time.sleep(0.05)
        return read(self, index)

    with mock.patch.object(data.ImageFiles, "__getitem__", slow_read):
        assert train_ddp.main([*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "2",
                               "--log-every", "2", "--workers", "0", "--output-dir", str(tmp_path)]) == 0
    record, = read_log(tmp_path)
    assert 4 * 0.05 <= record["data_wait_s"] <= record["step_time_s"]


# --------------------------------------------------------------------------------------
# The CPU augmentation path (data.CPUAugmentation): PIL's blur, JPEGs drafted at reduced size
# --------------------------------------------------------------------------------------

CPU_CFG = pqcl.Config(img_size=32, patch_size=4, query_size=16, global_scale=(0.25, 1.0), query_scale=(0.05, 0.25))


def photo(width=200, height=150, seed=0):
    """A photo-like PIL image: a smooth colour field plus pixel noise (bench.write_jpegs' recipe)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    return Image.fromarray((np.asarray(coarse, np.float32) + rng.normal(0, 24, (height, width, 3))).clip(0, 255).astype(np.uint8))


def test_pil_blur_is_pils_gaussian_blur_at_torchvisions_sigma():
    """PILGaussianBlur draws sigma as T.GaussianBlur does and applies PIL's GaussianBlur(radius
    = sigma) to PIL images: identical to that op. Against the exact Gaussian (torchvision's, same
    kernel size and sigma) on a photo-like image it differs by under 1 grey level on average and
    at most a few (the box approximation and the extended edges). Tensors get the exact path."""
    image, kernel = photo(), 23
    for seed in range(4):
        blur = data.PILGaussianBlur(kernel, (0.1, 2.0))
        torch.manual_seed(seed)
        sigma = blur.make_params([image])["sigma"][0]
        torch.manual_seed(seed)
        got = blur(image)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(image.filter(ImageFilter.GaussianBlur(sigma))))
        exact = TF.gaussian_blur(TF.pil_to_tensor(image), [kernel, kernel], [sigma, sigma])
        error = (TF.pil_to_tensor(got).int() - exact.int()).abs()
        inner = error[:, kernel:-kernel, kernel:-kernel]  # away from the edges
        assert inner.float().mean() < 1.0 and inner.max() <= 4, (sigma, inner.float().mean(), inner.max())
    pixels = TF.pil_to_tensor(image)
    for seed in range(3):
        outputs = []
        for blur_class in (data.PILGaussianBlur, data.SeparableGaussianBlur):
            torch.manual_seed(seed)
            outputs.append(blur_class(kernel, (0.1, 2.0))(pixels))
        assert torch.equal(*outputs)


def test_pil_blur_sigma_is_uniform_over_its_range():
    """Large sample: the empirical CDF of sigma stays within the Kolmogorov-Smirnov bound of
    U(0.1, 2.0) at the 0.1% level (1.95 / sqrt(n))."""
    n, blur = 4000, data.PILGaussianBlur(23, (0.1, 2.0))
    torch.manual_seed(0)
    sigmas = np.sort([blur.make_params([None])["sigma"][0] for _ in range(n)])
    uniform_cdf = (sigmas - 0.1) / 1.9
    ks = max(np.abs(uniform_cdf - np.arange(1, n + 1) / n).max(), np.abs(uniform_cdf - np.arange(n) / n).max())
    assert sigmas[0] >= 0.1 and sigmas[-1] <= 2.0 and ks < 1.95 / np.sqrt(n)


def test_cpu_path_draws_what_the_exact_path_draws_and_leaves_tensors_unchanged():
    """Same seed: the fast path (PIL blur) and the exact one make identical draws (boxes, flips,
    masks, positions; the blur's sigma consumes the same numbers), so the distributions are the
    old ones; tensor images (the built-in sets) give bit-identical samples to pqcl's recipe with
    the separable blur."""
    image = photo(64, 48)
    keys = ("global_boxes", "query_boxes", "global_flips", "query_flips", "masks", "query_pos")
    for seed in range(5):
        samples = {}
        for blur in data.BLURS:
            torch.manual_seed(seed)
            samples[blur] = data.augmentation(CPU_CFG, blur)(image)
        assert all(torch.equal(samples["pil"][k], samples["exact"][k]) for k in keys)
        tensor, outputs = TF.pil_to_tensor(image), []
        for augment in (data.augmentation(CPU_CFG), pqcl.PQCLAugmentation.from_config(CPU_CFG, blur=data.SeparableGaussianBlur)):
            torch.manual_seed(seed)
            outputs.append(augment(tensor))
        assert outputs[0].keys() == outputs[1].keys() and all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])


def coordinate_jpeg(path, side=250):
    """A JPEG whose red channel holds each pixel's column and green its row (0..255), near
    lossless (quality 100, no chroma subsampling)."""
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pixels = np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=100, subsampling=0)
    return path


# The coordinate JPEG's decode errs by up to ~2 grey levels (= source px) per pixel, some of it
# the same along a row; averaged over a 4 x 4 patch and divided by 8 to 31 source px per global
# patch it stays below 0.1 patch in 100 random boxes per reduction (largest seen 0.067, at
# reduction 2). A flip left out, or a box not scaled into the drafted image, misses by patches.
DRAFT_ORACLE_TOL = 0.1


def coordinate_oracle_miss(global_view, query_view, global_box, query_box, global_flip, query_flip, positions):
    """Views (3, s, s) of the coordinate JPEG -> the largest distance (global patches) between
    where their patches' pixels come from and where they should: the global view's patches on
    its integer grid, each query patch at `positions` (L, L, 2), seen in the displayed global view."""
    from test_pqcl import (
        ORACLE_GRID,
        ORACLE_QUERY_GRID,
        in_global_frame,
        patch_mean_source,
    )

    def source_of(view):  # the view's per-patch mean source (y, x): pixel value + 0.5
        return patch_mean_source(view.float() + 0.5)

    seen = in_global_frame(source_of(global_view), global_box, global_flip)
    rows, cols = torch.meshgrid(torch.arange(ORACLE_GRID) + 0.5, torch.arange(ORACLE_GRID) + 0.5, indexing="ij")
    global_miss = (seen - torch.stack([rows, cols], -1)).abs().max().item()
    extent = (torch.tensor(query_box[2:], dtype=torch.float64) / ORACLE_QUERY_GRID * ORACLE_GRID
              / torch.tensor(global_box[2:], dtype=torch.float64))  # (2,) a query patch's size in global patches
    seen = in_global_frame(source_of(query_view), global_box, global_flip)
    return max(global_miss, (seen - (positions.double() + extent / 2)).abs().max().item())


@pytest.mark.parametrize("reduction", [1, 2, 4])
def test_drafted_jpeg_crops_match_the_pixel_oracle(tmp_path, reduction):
    """Decoded at 1/reduction, each crop of a box given in source pixels shows those source
    pixels: the global view's patches sit on its integer grid, and each query patch where
    relative_positions says, flips included."""
    from test_pqcl import ORACLE_GRID, ORACLE_QUERY, ORACLE_QUERY_GRID, ORACLE_SIZE
    os.makedirs(tmp_path / "c")
    coordinate_jpeg(tmp_path / "c" / "coordinates.jpg")
    image, _ = data.ImageFiles(str(tmp_path), reduction=lambda width, height: reduction)[0]
    if reduction > 1:
        assert isinstance(image, data.DraftedImage) and image.reduction == reduction
        side = (250 + reduction - 1) // reduction  # JPEG's DCT scaling rounds up
        assert image.pixels.size == (side, side) and (image.width, image.height) == (250, 250)
    rng = np.random.default_rng(reduction)
    augment = data.augmentation(CPU_CFG)
    worst = 0.0
    for _ in range(100):
        # sides the draft allows (>= the view's size at the reduction), as draft_reduction guarantees
        g_side, q_side = rng.integers(max(64, ORACLE_SIZE * reduction), 251, 2), rng.integers(max(32, ORACLE_QUERY * reduction), 129, 2)
        global_box = (int(rng.integers(0, 251 - g_side[0])), int(rng.integers(0, 251 - g_side[1])), *map(int, g_side))
        query_box = (int(rng.integers(0, 251 - q_side[0])), int(rng.integers(0, 251 - q_side[1])), *map(int, q_side))
        global_flip, query_flip = map(bool, rng.integers(0, 2, 2))
        positions = pqcl.relative_positions(global_box, query_box, ORACLE_GRID, ORACLE_QUERY_GRID, global_flip, query_flip)
        global_view = TF.pil_to_tensor(augment.crop(image, global_box, ORACLE_SIZE, global_flip))
        query_view = TF.pil_to_tensor(augment.crop(image, query_box, ORACLE_QUERY, query_flip))
        worst = max(worst, coordinate_oracle_miss(global_view, query_view, global_box, query_box, global_flip,
                                                  query_flip, positions))
    assert worst < DRAFT_ORACLE_TOL


def test_draft_reduction_keeps_every_drawable_box_at_least_its_view_size():
    """The reduction chosen for an image: every box draw_box draws (2000 per view) spans at least
    the view's size times the reduction; the recipe's 500 x 375 photos are never reduced."""
    augment = data.augmentation(pqcl.Config())  # 224 px globals, scale >= 0.25; a 96 px query crop, >= 0.05
    assert augment.draft_reduction(500, 375) == 1 and augment.draft_reduction(2000, 1500) == 2
    assert augment.draft_reduction(8000, 6000) == 8
    torch.manual_seed(0)
    for width, height in ((2000, 1500), (1500, 3000), (4000, 3000)):
        reduction = augment.draft_reduction(width, height)
        drafted = data.DraftedImage(None, width, height, reduction)
        for size, scale in ((224, (0.25, 1.0)), (96, (0.05, 0.25))):
            sides = [min(augment.draw_box(drafted, scale)[2:]) for _ in range(2000)]
            assert min(sides) >= size * reduction, (width, height, size, reduction, min(sides))
    with_locals = data.augmentation(pqcl.Config(local_crops_number=2, local_crops_size=192))  # 0.05-0.4 of the area
    assert with_locals.draft_reduction(2000, 1500) == 1  # a 192 px local crop can be 335 px wide: never halved


def test_drafted_samples_are_deterministic_and_draw_the_full_decodes_boxes(tmp_path):
    """A 1024 x 768 JPEG through ImageFiles with draft_reduction (reduced 2x for these views) and
    Augmented: the same (seed, epoch, index) gives the same sample every time, with the boxes,
    flips, masks and positions of the full-size decode; the views differ only in resampling."""
    os.makedirs(tmp_path / "c")
    photo(1024, 768).save(tmp_path / "c" / "photo.jpg", quality=90)
    augment = data.augmentation(CPU_CFG)
    drafted = data.Augmented(data.ImageFiles(str(tmp_path), reduction=augment.draft_reduction), augment, seed=3)
    full = data.Augmented(data.ImageFiles(str(tmp_path)), augment, seed=3)
    assert isinstance(drafted.source[0][0], data.DraftedImage) and drafted.source[0][0].reduction > 1
    for epoch in range(3):
        a, b, c = drafted[epoch, 0], drafted[epoch, 0], full[epoch, 0]
        tensors = [k for k in a if torch.is_tensor(a[k])]  # all but the count of skipped files
        assert all(torch.equal(a[k], b[k]) for k in tensors)
        assert all(torch.equal(a[k], c[k]) for k in tensors if k not in ("globals", "queries"))
        assert (a["globals"] - c["globals"]).abs().mean() < 0.1  # normalised units: ~5 grey levels


def test_knn_monitor_logs_the_teachers_knn_at_its_cadence_and_costs_nothing_when_off(tiny_images, tmp_path):
    """--knn-every 1 --knn-data embedded (cut to 64 / 24 images): knn_top1 in log.jsonl at the end
    of each epoch only (steps 4 and 8), the last equal to the k-NN (k 20) of the final teacher on
    the embedded test split computed in memory; off by default: the monitor never runs."""
    common = [*TINY_RUN, "--data", tiny_images, "--batch-size", "8"]
    evaluate.evaluation_sets.cache_clear()  # read the embedded set at the size set below
    with mock.patch.multiple(data, EMBEDDED_TRAIN=64, EMBEDDED_TEST=24):
        assert train_ddp.main([*common, "--output-dir", str(tmp_path / "on"), "--knn-every", "1",
                               "--knn-data", "embedded"]) == 0
        (train_images, train_labels, _), (test_images, test_labels, _) = data.embedded_splits(0, 32)
    records = read_log(tmp_path / "on")
    assert [r["step"] for r in records if "knn_top1" in r] == [4, 8] and len(records) == 8
    backbone, _ = checkpoints.backbone_from_checkpoint(str(tmp_path / "on" / "checkpoint.pth"))
    features = [evaluate.backbone_features(backbone, images, keep_patches=False)["image"]
                for images in (train_images, test_images)]
    expected = evaluate.knn_scores(features[0], train_labels, features[1], test_labels, ks=(20,))["knn_top1_k20"]
    assert records[-1]["knn_top1"] == expected
    with mock.patch.object(evaluate, "knn_monitor", side_effect=AssertionError("the monitor ran")):
        assert train_ddp.main([*common, "--output-dir", str(tmp_path / "off")]) == 0
    assert not any("knn_top1" in r for r in read_log(tmp_path / "off"))


@pytest.mark.parametrize("argv,says", [
    (["--knn-every", "1"], "--knn-every EPOCHS (at least 1) and --knn-data ROOT go together"),
    (["--knn-data", "embedded"], "go together"),
    (["--knn-every", "1", "--knn-data", "no/such/root"], "--knn-data no/such/root: has no train/ folder"),
])
def test_knn_monitor_bad_flags_exit_2_before_anything_is_written(argv, says, tmp_path, capsys):
    assert train_ddp.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------
# Reruns, extensions, restarts and changes of process count (issue 13)
# --------------------------------------------------------------------------------------


def folder_stamps(folder):
    """{name: (size, mtime_ns)} of every file in `folder`: what a run that touches nothing leaves."""
    return {entry.name: (entry.stat().st_size, entry.stat().st_mtime_ns) for entry in os.scandir(folder)}


def moved(a, b):
    """The largest change of any weight between two state dicts."""
    return max((a[name] - b[name]).abs().max().item() for name in a)


def test_same_command_twice_resumes_a_finished_rerun_touches_nothing_and_fresh_keeps_the_old_run(
        tiny_images, tmp_path, capsys):
    """The same command again resumes at the checkpoint's step (log records the dead run wrote
    past it, and a torn last line, are dropped: every step once) and ends with the weights of an
    uninterrupted run; rerunning the finished run, or with a smaller --max-steps, leaves every
    file as it was; --fresh moves the old files into previous-<time>/ and starts at step 0."""
    common = [*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--ckpt-every", "1", "--drop-path-rate", "0.2"]
    assert train_ddp.main([*common, "--max-steps", "6", "--output-dir", str(tmp_path / "whole")]) == 0
    run_dir = tmp_path / "run"
    assert train_ddp.main([*common, "--max-steps", "3", "--output-dir", str(run_dir)]) == 0
    with open(run_dir / "log.jsonl", "a") as log:  # what a run killed after its checkpoint of step 3 leaves
        log.write('{"step": 4, "loss": -1}\n{"step": 5, "loss": -1}\n{"step": 6, "lo')
    capsys.readouterr()
    assert train_ddp.main([*common, "--max-steps", "6", "--output-dir", str(run_dir)]) == 0
    assert "resuming at step 3 of 6" in capsys.readouterr().out
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3, 4, 5, 6] and all(r["loss"] > 0 for r in read_log(run_dir))
    final, reference = load(run_dir), load(tmp_path / "whole")
    assert_states_close(final["teacher"], reference["teacher"], atol=1e-6)
    assert_states_close(final["student"], reference["student"], atol=1e-6)

    before = folder_stamps(run_dir)
    for max_steps in ("6", "4"):
        assert train_ddp.main([*common, "--max-steps", max_steps, "--output-dir", str(run_dir)]) == 0
        assert f"the run is done (step 6 of {max_steps})" in capsys.readouterr().out
        assert folder_stamps(run_dir) == before

    assert train_ddp.main([*common, "--max-steps", "2", "--output-dir", str(run_dir), "--fresh"]) == 0
    (aside,) = [path for path in run_dir.iterdir() if path.name.startswith("previous-")]
    assert f"the old run moved to {aside}" in capsys.readouterr().out
    assert sorted(os.listdir(aside)) == ["backbone.pth", "checkpoint.pth", "log.jsonl"]
    assert load(aside)["step"] == 6 and read_log(aside)[-1]["step"] == 6
    assert load(run_dir)["step"] == 2 and [r["step"] for r in read_log(run_dir)] == [1, 2]


@pytest.fixture(scope="module")
def two_step_run(tiny_images, tmp_path_factory):
    """A finished 2-step run (1 process x batch 4, TINY_RUN on tiny_images): its folder."""
    run_dir = tmp_path_factory.mktemp("two_steps")
    assert train_ddp.main([*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "2",
                           "--output-dir", str(run_dir)]) == 0
    return run_dir


@pytest.mark.parametrize("args, message", [
    (["--arch", "vit_small"], "--arch vit_small: the run in {run} was started with arch vit_tiny; drop --arch"),
    (["--depth", "3"], "--depth 3: the run in {run} was started with depth 2"),
    (["--img-size", "48"], "started with img_size 32"),
    (["--patch-size", "4"], "started with patch_size 8"),
    (["--query-size", "8"], "started with query_size 16"),
    (["--framework", "dino"], "started with framework ibot"),
    (["--query-weight", "0"], "started with query_weight 1.0"),
    (["--patch-weight", "0.5"], "started with patch_weight 1.0"),
    (["--head-mode", "semi-shared"], "started with head_mode shared"),
    (["--out-dim", "128"], "started with out_dim 64"),
    (["--teacher-temp", "0.05"], "started with teacher_temp 0.07"),
    (["--student-temp", "0.2"], "started with student_temp 0.1"),
    (["--global-scale", "0.3", "1.0"], "started with global_scale (0.25, 1.0)"),
    (["--num-queries", "2"], "started with num_queries 1"),
    (["--seed", "1"], "started with seed 0"),
    (["--lr", "1e-2"], "started with lr 0.001"),
    (["--data", "embedded"], "--data embedded: the run in {run} was started with data {images}"),
    (["--subset", "16"], "started with subset 0"),
    (["--preset", "embedded"], "started with preset recipe"),
    (["--augment-on", "device"], "started with augment_on cpu"),
    (["--epochs", "1"], "--epochs 1: the run in {run} plans 2 epochs; to stop it earlier pass --max-steps"),
    (["--batch-size", "8"], "global batch of 8, but the run in {run} trained with 4 x 1 = 4; pass --batch-size 4"),
])
def test_a_flag_that_changes_the_run_is_refused_on_resume(two_step_run, tiny_images, capsys, args, message):
    """On a resume every flag given that would change the model, the method, the data or the
    global batch exits 2 with one line naming it, the checkpoint's value and the fix
    (--fresh), and leaves every file of the run as it was."""
    before = folder_stamps(two_step_run)
    assert train_ddp.main([*TINY_RUN, "--data", tiny_images, "--max-steps", "4", "--output-dir", str(two_step_run),
                           *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message.format(run=two_step_run, images=tiny_images) in lines[0], lines
    assert "pass --fresh" in lines[0]
    assert folder_stamps(two_step_run) == before


def test_epochs_extension_runs_to_the_new_end_with_the_recomputed_schedule(tiny_images, tmp_path, capsys):
    """A finished 2-epoch run given --epochs 3 continues to step 12 with lr and teacher momentum
    on the cosines of a 12-step run (written out here), and the safe flags given apply
    (--log-every 2: records at steps 10 and 12 only); --keep-every 1 keeps one snapshot per epoch,
    each the state after that epoch."""
    args = [*TINY_RUN, "--data", tiny_images, "--batch-size", "8", "--keep-every", "1", "--output-dir", str(tmp_path)]
    assert train_ddp.main(args) == 0  # 32 images / 8 = 4 steps per epoch, 8 steps
    assert train_ddp.main([*args, "--epochs", "3", "--log-every", "2", "--precision", "fp32", "--workers", "0"]) == 0
    assert "resuming at step 8 of 12, extended from 2 to 3 epochs" in capsys.readouterr().out
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [*range(1, 9), 10, 12]
    peak, warmup, total = 1e-3 * 8 / 256, 4, 12  # lr x batch / 256; 1 warm-up epoch; 3 epochs of 4 steps
    for record in records[-2:]:
        step = record["step"] - 1  # a record holds the schedule of its interval's last step
        progress = (step - warmup) / (total - warmup)
        assert record["lr"] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6) * (1 + math.cos(math.pi * progress)), rel=1e-9)
        assert record["momentum"] == pytest.approx(1 - 0.5 * (1 - 0.996) * (1 + math.cos(math.pi * step / total)),
                                                   rel=1e-12)
    final = load(tmp_path)
    assert final["step"] == 12 and final["config"]["epochs"] == 3
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-epoch")) == \
        ["checkpoint-epoch0001.pth", "checkpoint-epoch0002.pth", "checkpoint-epoch0003.pth"]
    snapshots = [torch.load(tmp_path / f"checkpoint-epoch000{epoch}.pth", weights_only=True) for epoch in (1, 2, 3)]
    assert [snapshot["step"] for snapshot in snapshots] == [4, 8, 12]
    assert_states_close(snapshots[2]["teacher"], final["teacher"], atol=0)


def worker_pids(agent_pid):
    """The processes torchrun's agent (`agent_pid`) started: its workers."""
    with open(f"/proc/{agent_pid}/task/{agent_pid}/children") as f:
        return [int(pid) for pid in f.read().split()]


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tiny_images, tmp_path):
    """2 gloo processes under torchrun --max-restarts=1, one worker SIGKILLed after the first
    checkpoint: torchrun restarts both with the same command line, they resume at the last
    checkpoint, and the run ends with the teacher of an uninterrupted one (atol 1e-6, against
    a teacher that moved far more over the run), each step once in log.jsonl."""
    common = [*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "8", "--ckpt-every", "2",
              "--drop-path-rate", "0.2", "--lr", "2e-2", "--momentum-teacher", "0.9"]
    run_torchrun([*common, "--keep-every", "1", "--output-dir", str(tmp_path / "whole")])
    killed_dir = tmp_path / "killed"
    agent = subprocess.Popen(torchrun_command([*common, "--output-dir", str(killed_dir)], max_restarts=1),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=CHILD_ENV)
    deadline = time.time() + 120
    while not (killed_dir / "checkpoint.pth").exists() and time.time() < deadline and agent.poll() is None:
        time.sleep(0.02)
    os.kill(worker_pids(agent.pid)[-1], signal.SIGKILL)
    stdout, stderr = agent.communicate(timeout=300)
    assert agent.returncode == 0, stderr[-3000:]
    assert "resuming at step" in stdout, "the worker was not killed before the run ended"
    assert [r["step"] for r in read_log(killed_dir)] == list(range(1, 9))
    final, reference = load(killed_dir), load(tmp_path / "whole")
    assert final["step"] == reference["step"] == 8
    assert_states_close(final["teacher"], reference["teacher"], atol=1e-6)
    after_one_epoch = torch.load(tmp_path / "whole" / "checkpoint-epoch0001.pth", weights_only=True)
    assert moved(reference["teacher"], after_one_epoch["teacher"]) > 100 * 1e-6


def test_two_processes_by_8_resumed_as_one_by_16_match_the_uninterrupted_run(tiny_images, tmp_path, capsys):
    """A 2 x 8 checkpoint resumed on 1 process x 16 (same global batch) continues at the same
    samples and ends with the uninterrupted 2 x 8 run's weights; 1 process without --batch-size
    (global batch 8) is refused with the numbers and the fix. No drop path: its masks are drawn
    per rank (seeded by seed, rank, step), so a different process count draws others, which are
    equally valid but not equal."""
    common = [*TINY_RUN, "--data", tiny_images, "--drop-path-rate", "0", "--lr", "0.3", "--momentum-teacher", "0.5",
              *FP32]
    run_torchrun([*common, "--batch-size", "8", "--max-steps", "4", "--output-dir", str(tmp_path / "whole")])
    run_torchrun([*common, "--batch-size", "8", "--max-steps", "1", "--output-dir", str(tmp_path / "moved")])
    halfway = load(tmp_path / "moved")  # mid-epoch: 32 images / 16 = 2 steps per epoch
    assert halfway["world_size"] == 2 and halfway["step"] == 1
    assert train_ddp.main([*common, "--max-steps", "4", "--output-dir", str(tmp_path / "moved")]) == 2
    assert "pass --batch-size 16 to continue it sample for sample" in capsys.readouterr().err
    assert train_ddp.main([*common, "--batch-size", "16", "--max-steps", "4", "--output-dir", str(tmp_path / "moved")]) == 0
    assert "resuming at step 1 of 4" in capsys.readouterr().out
    final, reference = load(tmp_path / "moved"), load(tmp_path / "whole")
    assert final["step"] == 4 and final["world_size"] == 1
    # The key bias has no true gradient (softmax ignores a constant added to every key), so AdamW
    # turns the rounding noise of its gradient, which differs with the order of the sums (an
    # all-reduce of 2 means vs one mean of 16), into lr-sized steps that change nothing computed.
    for part in ("student", "teacher", "centers"):
        final_part, reference_part, halfway_part = (without_key_bias(state[part]) for state in (final, reference, halfway))
        assert_states_close(final_part, reference_part, atol=2e-5)
        assert moved(reference_part, halfway_part) > 100 * 2e-5, part
    assert [r["step"] for r in read_log(tmp_path / "moved")] == [1, 2, 3, 4]


def test_a_checkpoint_from_before_run_settings_were_recorded_still_resumes(tiny_images, tmp_path):
    """Checkpoints written before the run settings (data, subset, preset) were recorded resume
    from the command line's settings, and the model flags are still checked."""
    args = [*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--output-dir", str(tmp_path)]
    assert train_ddp.main([*args, "--max-steps", "2"]) == 0
    checkpoint = load(tmp_path)
    del checkpoint["run"]
    checkpoints.save_atomic(checkpoint, str(tmp_path / "checkpoint.pth"))
    assert train_ddp.main([*args, "--max-steps", "3", "--depth", "3"]) == 2  # conflicts with depth 2
    assert train_ddp.main([*args, "--max-steps", "3"]) == 0
    assert load(tmp_path)["step"] == 3 and [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]


def test_built_in_sets_default_to_the_batched_photometry_and_resume_keeps_the_path(tmp_path, capsys):
    """A new run on a built-in set (tensors in memory) on a CPU augments on "device" (the
    photometry batched in the training process) and records it; a checkpoint from before runs
    recorded the path resumes on the CPU path, its default then; a resume refuses the other."""
    args = [*TINY_RUN, "--output-dir", str(tmp_path)]
    with mock.patch.multiple(data, EMBEDDED_TRAIN=128, EMBEDDED_TEST=48):
        assert train_ddp.main([*args, "--max-steps", "1"]) == 0
        assert "augmentation on device" in capsys.readouterr().out
        checkpoint = load(tmp_path)
        assert checkpoint["run"]["augment_on"] == "device"
        del checkpoint["run"]["augment_on"]
        checkpoints.save_atomic(checkpoint, str(tmp_path / "checkpoint.pth"))
        assert train_ddp.main([*args, "--max-steps", "2"]) == 0
        assert "augmentation on cpu" in capsys.readouterr().out and load(tmp_path)["run"]["augment_on"] == "cpu"
        assert train_ddp.main([*args, "--max-steps", "3", "--augment-on", "device"]) == 2
        assert "started with augment_on cpu" in capsys.readouterr().err and load(tmp_path)["step"] == 2


# --------------------------------------------------------------------------------------
# The device path (data.DeviceAugmentation + data.photometric): geometry in the workers,
# photometry batched on the device
# --------------------------------------------------------------------------------------


def photo_views(count, size=32):
    """`count` photo-like uint8 views (count, 3, size, size), saturated and grey pixels among them."""
    views = torch.stack([TF.pil_to_tensor(photo(size, size, seed)) for seed in range(count)])  # (n, 3, s, s)
    views[0, :, :4] = 255  # white, and below a grey block: hue's and saturation's edge cases
    views[0, :, 4:8] = 128
    return views


def factor_draws(count, low, high, seed=0):
    return torch.empty(count).uniform_(low, high, generator=torch.Generator().manual_seed(seed))  # (n,)


def jitter_blend_as(adjustment, views, factors):  # every view makes the same blend adjustment
    return data.jitter_blend(views, torch.full(factors.shape, adjustment), factors)


BATCHED_OPS = [  # (name, batched op (views, per-view values), torchvision's op at one value, value range)
    ("brightness", functools.partial(jitter_blend_as, data.BRIGHTNESS), TF.adjust_brightness, (0.6, 1.4)),
    ("contrast", functools.partial(jitter_blend_as, data.CONTRAST), TF.adjust_contrast, (0.6, 1.4)),
    ("saturation", functools.partial(jitter_blend_as, data.SATURATION), TF.adjust_saturation, (0.8, 1.2)),
    ("hue", data.adjust_hue, TF.adjust_hue, (-0.5, 0.5)),
    ("blur", lambda views, sigmas: data.gaussian_blur(views, sigmas, 7), lambda image, sigma: TF.gaussian_blur(image, [7, 7], [sigma, sigma]), (0.1, 2.0)),
    ("solarize", lambda views, draws: data.solarize(views, draws < 0.6, 128 / 255),  # applied where the draw < 0.6
     lambda image, draw: TF.solarize(image, 128 if image.dtype == torch.uint8 else 128 / 255) if draw < 0.6 else image,
     (0.2, 1.0)),
]


@pytest.mark.parametrize("name,batched,reference,value_range", BATCHED_OPS, ids=[op[0] for op in BATCHED_OPS])
def test_batched_op_equals_torchvisions_op_per_view(name, batched, reference, value_range):
    """Six views, each with its own value: view i of the batched op equals torchvision's functional
    op on view i alone at value i, to 1e-5 on float images (float32 rounding; the HSV round trip
    and the blur's kernel are computed in another order). On uint8 images torchvision rounds to
    uint8 after the op (truncates for the blends, rounds for blur and hue): the batched op on
    the same pixels / 255, times 255 and rounded, is within 1 grey level of it."""
    views = photo_views(6)
    values = factor_draws(6, *value_range)
    got = batched(views.float() / 255, values)  # (n, 3, s, s)
    for view, value, out in zip(views, values.tolist(), got):
        torch.testing.assert_close(out, reference(view.float() / 255, value), atol=1e-5, rtol=0)
        level_error = ((out * 255).round() - reference(view, value).float()).abs().max()
        assert level_error <= 1, (name, value, level_error)


def test_jitter_blend_makes_each_views_own_adjustment():
    """One batch, each view its own blend (brightness, contrast, saturation, or an index of none:
    hue's, which blends like brightness) at its own factor: view i equals torchvision's op alone."""
    views = photo_views(8).float() / 255
    adjustments = torch.tensor([data.SATURATION, data.BRIGHTNESS, data.CONTRAST, data.CONTRAST,
                                data.SATURATION, data.BRIGHTNESS, data.HUE, data.CONTRAST])
    factors = factor_draws(8, 0.6, 1.4)
    reference = {data.BRIGHTNESS: TF.adjust_brightness, data.CONTRAST: TF.adjust_contrast,
                 data.SATURATION: TF.adjust_saturation, data.HUE: TF.adjust_brightness}
    got = data.jitter_blend(views, adjustments, factors)
    for view, adjustment, factor, out in zip(views, adjustments.tolist(), factors.tolist(), got):
        torch.testing.assert_close(out, reference[adjustment](view, factor), atol=1e-5, rtol=0)


def test_batched_grayscale_equals_torchvisions():
    views = photo_views(3).float() / 255
    torch.testing.assert_close(data.grayscale(views), TF.rgb_to_grayscale(views), atol=1e-6, rtol=0)


def reference_photometric(view, parameters, recipe):
    """One float view (3, s, s) in [0, 1] through torchvision's functional ops with the drawn
    parameters, in the CPU path's order (ColorJitter.transform's loop, then the rest)."""
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    if parameters[data.JITTER]:
        for op_index in parameters[data.ORDER].long().tolist():
            view = adjust[op_index](view, parameters[data.FACTORS][op_index].item())
    if parameters[data.GRAYSCALE]:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if parameters[data.BLUR]:
        sigma = parameters[data.SIGMA].item()
        view = TF.gaussian_blur(view, [recipe.kernel_size] * 2, [sigma, sigma])
    if parameters[data.SOLARIZE]:
        view = TF.solarize(view, recipe.solarize_threshold / 255)
    return TF.normalize(view, list(recipe.mean), list(recipe.std))


def test_photometric_stage_is_torchvisions_pipeline_per_view():
    """64 views, parameters drawn with every probability at 0.5 (all branches and orders occur):
    each equals torchvision's functional ops on it alone, in the drawn order, to 1e-4 in
    normalised units, except pixels that float rounding puts on the other side of the solarize
    threshold (at most 0.1% of them)."""
    recipe = dataclasses.replace(data.augmentation(CPU_CFG, on="device").recipes["globals"][1],
                                 jitter_p=0.5, grayscale_p=0.5, blur_p=0.5, solarize_p=0.5)
    torch.manual_seed(0)
    parameters = torch.stack([recipe.draw() for _ in range(64)])  # (64, PARAMETERS)
    views = photo_views(64)
    got = data.photometric(views, parameters, recipe)
    assert got.dtype == torch.float32 and got.shape == views.shape
    expected = torch.stack([reference_photometric(view.float() / 255, p, recipe) for view, p in zip(views, parameters)])
    off = (got - expected).abs() > 1e-4
    assert off.float().mean() <= 1e-3, off.float().mean()
    orders = {tuple(p[data.ORDER].long().tolist()) for p in parameters if p[data.JITTER]}
    assert len(orders) > 12 and 0 < parameters[:, data.SOLARIZE].sum() < 64


def ks_uniform(samples, low, high):
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and U(low, high)."""
    samples = np.sort(np.asarray(samples))
    cdf, n = (samples - low) / (high - low), len(samples)
    return max(np.abs(cdf - np.arange(1, n + 1) / n).max(), np.abs(cdf - np.arange(n) / n).max())


def test_photometric_draws_follow_torchvisions_distributions():
    """n = 6000 draws per view kind of the recipe's device path. Each Bernoulli rate (RandomApply
    ColorJitter 0.8, RandomGrayscale 0.2, blur 1.0 / 0.1 / 0.5 / 0.5, solarize 0 / 0.2 / 0 / 0)
    is within 4 standard errors sqrt(p (1 - p) / n); each factor of ColorJitter(0.4, 0.4, 0.2,
    0.1) (brightness, contrast U(0.6, 1.4), saturation U(0.8, 1.2), hue U(-0.1, 0.1)) and
    GaussianBlur's sigma (U(0.1, 2.0) x side / 224) within the Kolmogorov-Smirnov bound
    1.95 / sqrt(n) (0.1% level); the jitter order's counts over the 24 permutations below
    chi-square's 0.1% point for 23 degrees of freedom (49.7)."""
    cfg = pqcl.Config(local_crops_number=2)  # 224 px globals, 96 px queries and locals
    recipes = data.augmentation(cfg, on="device").recipes
    kinds = [(recipes["globals"][0], 224, 1.0, 0.0), (recipes["globals"][1], 224, 0.1, 0.2),
             (recipes["queries"][0], 96, 0.5, 0.0), (recipes["locals"][0], 96, 0.5, 0.0)]
    n = 6000
    torch.manual_seed(0)
    for recipe, side, blur_p, solarize_p in kinds:
        draws = torch.stack([recipe.draw() for _ in range(n)])  # (n, PARAMETERS)
        for column, p in ((data.JITTER, 0.8), (data.GRAYSCALE, 0.2), (data.BLUR, blur_p), (data.SOLARIZE, solarize_p)):
            assert abs(draws[:, column].mean().item() - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (side, column, p)
        ranges = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1), (0.1 * side / 224, 2.0 * side / 224)]
        for values, (low, high) in zip([*draws[:, data.FACTORS].T, draws[:, data.SIGMA]], ranges):
            assert low <= values.min() and values.max() <= high and ks_uniform(values, low, high) < 1.95 / math.sqrt(n)
        orders = [tuple(order) for order in draws[:, data.ORDER].long().tolist()]
        counts = np.array([orders.count(perm) for perm in itertools.permutations(range(4))])
        assert counts.sum() == n and ((counts - n / 24) ** 2 / (n / 24)).sum() < 49.7
        assert recipe.kernel_size == 2 * round(0.05 * side) + 1


def device_jpegs(root, count=8):
    os.makedirs(root / "c")
    for i in range(count):
        photo(120, 90, seed=i).save(root / "c" / f"{i}.jpg", quality=90)
    return str(root)


def device_batches(root, workers, epochs=2, batch_size=4):
    """Every batch of `epochs` epochs of the device path, photometric stage applied (on the CPU)."""
    augment = data.augmentation(CPU_CFG, on="device")
    source = data.ImageFiles(root, reduction=augment.draft_reduction)
    sampler = data.ResumableSampler(len(source), batch_size, seed=5)
    loader = DataLoader(data.Augmented(source, augment, seed=5), batch_size=batch_size, sampler=sampler,
                        num_workers=workers)
    batches = []
    for epoch in range(epochs):
        sampler.set_position(epoch)
        batches += [augment.photometric(batch) for batch in loader]
    return batches


def test_device_path_samples_repeat_for_any_number_of_workers(tmp_path):
    """Same (seed, epoch, index): the same normalised views and geometry on every run and with 0
    or 2 DataLoader workers; the epochs differ."""
    root = device_jpegs(tmp_path)
    runs = [device_batches(root, 0), device_batches(root, 0), device_batches(root, 2)]
    for run in runs[1:]:
        assert len(run) == len(runs[0]) == 4
        for got, expected in zip(run, runs[0]):
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert not torch.equal(runs[0][0]["globals"], runs[0][2]["globals"])  # epoch 0 and 1, same step
    assert runs[0][0]["globals"].dtype == torch.float32 and "globals_photometric" not in runs[0][0]


def test_device_path_positions_match_the_pixel_oracle(tmp_path):
    """The worker's uint8 views of the coordinate JPEG show the source pixels the sample's
    query_pos says (flips included), as on the CPU path; the photometric stage changes the views
    only, never the geometry, masks or positions."""
    from test_pqcl import ORACLE_GRID, ORACLE_QUERY, ORACLE_SIZE
    os.makedirs(tmp_path / "c")
    coordinate_jpeg(tmp_path / "c" / "coordinates.jpg")
    augment = data.augmentation(CPU_CFG, on="device")
    assert (augment.global_size, augment.query_size, augment.global_size // augment.patch_size) == (ORACLE_SIZE, ORACLE_QUERY, ORACLE_GRID)
    samples = data.Augmented(data.ImageFiles(str(tmp_path)), augment, seed=0)
    worst, flips = 0.0, set()
    for index in range(40):
        sample = samples[index, 0]
        assert sample["globals"].dtype == sample["queries"].dtype == torch.uint8
        for v in range(2):
            flips.add((bool(sample["global_flips"][v]), bool(sample["query_flips"][0])))
            worst = max(worst, coordinate_oracle_miss(
                sample["globals"][v], sample["queries"][0], sample["global_boxes"][v].tolist(),
                sample["query_boxes"][0].tolist(), bool(sample["global_flips"][v]), bool(sample["query_flips"][0]),
                sample["query_pos"][v, 0].view(4, 4, 2)))
    assert worst < DRAFT_ORACLE_TOL and len(flips) == 4
    batch = {k: v[None] for k, v in sample.items() if torch.is_tensor(v)}
    finished = augment.photometric(batch)
    for key in ("query_pos", "masks", "global_boxes", "query_boxes", "global_flips", "query_flips"):
        assert torch.equal(finished[key], batch[key])


def test_device_stage_pairs_each_view_with_its_own_parameters(tmp_path):
    """A collated batch of three samples with two query crops: each normalised view (b, v) of
    DeviceAugmentation.photometric is data.photometric of that view alone with its own drawn
    parameters and its kind's recipe (view 2's solarize, the query crops' smaller blur kernel)."""
    root = device_jpegs(tmp_path, count=3)
    augment = data.augmentation(dataclasses.replace(CPU_CFG, num_queries=2), on="device")
    samples = data.Augmented(data.ImageFiles(root), augment, seed=1)
    batch = default_collate([samples[0, index] for index in range(3)])
    finished = augment.photometric(batch)
    for kind in ("globals", "queries"):
        recipe = augment.recipes[kind][0]
        for b, v in itertools.product(range(3), range(2)):
            alone = data.photometric(batch[kind][b, v:v + 1], batch[f"{kind}_photometric"][b, v:v + 1], recipe)
            assert torch.equal(finished[kind][b, v], alone[0]), (kind, b, v)


def test_training_on_the_device_path_runs_and_differs_from_the_cpu_path(tiny_images, tmp_path, capsys):
    """train_ddp --augment-on device (here on the CPU): trains with finite losses and says so
    in its start line; its pixels differ from --augment-on cpu's (the default for a folder on a CPU), so
    do the losses."""
    losses = {}
    for augment_on in ("cpu", "device"):
        output = tmp_path / augment_on
        assert train_ddp.main([*TINY_RUN, "--data", tiny_images, "--batch-size", "4", "--max-steps", "2",
                               "--augment-on", augment_on, "--output-dir", str(output)]) == 0
        assert f"augmentation on {augment_on}" in capsys.readouterr().out
        losses[augment_on] = [record["loss"] for record in read_log(output)]
    assert all(map(math.isfinite, losses["device"])) and losses["device"] != losses["cpu"]


def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_device_worker_memory_does_not_grow_over_an_epoch(tmp_path):
    """A worker's 300 samples at the recipe's sizes (224 px globals: 300 kB of views each): its
    resident memory after them is within 20 MB of after the first 30 (holding one view per
    sample would add 45 MB), and it keeps no parameters between samples."""
    root = device_jpegs(tmp_path, count=4)
    augment = data.augmentation(pqcl.Config(), on="device")
    samples = data.Augmented(data.ImageFiles(root), augment, seed=0)
    for index in range(300):
        samples[index // 4, index % 4]
        if index == 29:
            train_ddp.release_freed_memory()
            start = resident_mb()
    train_ddp.release_freed_memory()
    assert resident_mb() - start < 20 and not augment._drawn
