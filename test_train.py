"""train_ddp.py, data.py and checkpoints.py: DDP against one process, exact resume after
SIGKILL, SIGTERM, atomic checkpoints, export, unreadable images, bad input, the sampler.

    python -m pytest test_train.py -q
"""
import copy
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
from PIL import Image

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
    temperature, each gradient tensor clipped to norm `clip` on its own, the head's last
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
            frozen = schedule["freeze_last_layer"] and ".last_layer." in name
            fed[name] = None if frozen else p.grad * min(1.0, clip / (p.grad.norm().item() + 1e-6))
            if frozen:
                continue
            module = name.split(".")[-2]
            decay = 0.0 if name.endswith(".bias") or module.startswith("norm") else schedule["weight_decay"]
            first_moment, second_moment = (1 - betas[0]) * fed[name], (1 - betas[1]) * fed[name] ** 2
            update = (first_moment / (1 - betas[0])) / ((second_moment / (1 - betas[1])).sqrt() + eps)
            p.mul_(1 - schedule["lr"] * decay).sub_(schedule["lr"] * update)
        student = dict(model.student.named_parameters())
        for name, t in model.teacher.named_parameters():
            t.copy_(schedule["momentum"] * t + (1 - schedule["momentum"]) * student[name])
    return out["loss"].detach(), fed


@pytest.mark.parametrize("step", [1, 3])
def test_train_step_is_the_reference_step(step):
    """train_step with schedule_at's values equals the reference step on a tiny model (student
    randomised, so the teacher differs and some gradients exceed the clip while others do
    not): the schedule at that step, the gradients handed to AdamW (clipped per tensor; no
    last layer at step 1, the first epoch), the student after the step (no decay on biases and
    norms) and the EMA teacher."""
    model = randomize_(tiny_pqcl(**STEP_CONFIG).train(), seed=2)
    batch = tiny_batch(model.cfg)
    schedule = train_ddp.schedule_at(model.cfg, step, STEPS_PER_EPOCH)
    assert schedule.keys() == expected_schedule(step).keys()
    assert schedule == pytest.approx(expected_schedule(step), rel=1e-12)
    reference = copy.deepcopy(model)
    expected_loss, expected_fed = reference_step(reference, batch, expected_schedule(step))

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
    common = [*TINY_RUN, *MOVING, "--data", tiny_images, "--max-steps", "3", "--drop-path-rate", "0"]
    single = run_cli([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          TRAIN_DDP, *common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=REPO, env=CHILD_ENV)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
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


def test_sigterm_saves_and_exits_cleanly(tiny_images, tmp_path):
    """SIGTERM (preemption): the run writes a checkpoint at a completed step and exits 0."""
    args = [*TINY_RUN, "--data", tiny_images, "--epochs", "50", "--batch-size", "4", "--ckpt-every", "1000",
            "--output-dir", str(tmp_path)]
    process = start_cli(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout
    checkpoint = load(tmp_path)
    assert 1 <= checkpoint["step"] < 50 * 8 and checkpoint["step"] == read_log(tmp_path)[-1]["step"]


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

    def nan_from_step_3(self, batch, teacher_temp=None):
        out = forward(self, batch, teacher_temp)
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
    (["--resume"], "no checkpoint there"),
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
    moved far from their start by MOVING): the embedded default runs, logs and exports, and
    eval.json's two k-NN figures are the cosine k-NN (k = 20, T = 0.07) recomputed by brute
    force on the test split, from the exported backbone.pth and from the initialisation of the
    run's seed, whose predictions differ (so the two figures cannot be swapped unseen)."""
    with mock.patch.multiple(data, EMBEDDED_TRAIN=128, EMBEDDED_TEST=48):
        assert train_ddp.main(["--max-steps", "3", *MOVING, "--output-dir", str(tmp_path)]) == 0
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


