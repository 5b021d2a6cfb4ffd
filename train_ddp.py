"""Pretrain PQCL (pqcl.py) on one CPU or on many GPUs.

    python train_ddp.py                         # embedded shapes dataset, CPU, a few minutes, prints k-NN
    python train_ddp.py --data /imagenet/train  # one process on an ImageFolder tree, the authors' ViT-S recipe
    torchrun --nproc_per_node=8 train_ddp.py --data /imagenet/train --arch vit_small --output-dir runs/vits16
    torchrun --nnodes=2 --nproc_per_node=8 --node-rank=$RANK --rdzv-backend=c10d \\
             --rdzv-endpoint=$HEAD_NODE:29500 train_ddp.py --data /imagenet/train --output-dir runs/vits16
    python train_ddp.py --export runs/vits16/checkpoint.pth backbone.pth   # teacher backbone, timm names

A folder that holds a checkpoint resumes it (the same command again, a torchrun restart, a
larger --epochs, another process count at the same global batch); a flag that would change
the run is refused; --fresh starts over and moves the old run aside.

The method lives in pqcl.py, the data in data.py, the checkpoints in checkpoints.py and the
k-NN of eval.json in evaluate.py; this file is the command line, the step and the loop: DDP,
mixed precision, schedules, exact resume, logs. Every pqcl.Config field is a flag
(--query-weight, --num-queries, ...) on top of a preset: the authors' recipe for an
ImageFolder, a CPU preset for each built-in set (--preset).
"""
import argparse
import ctypes
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import checkpoints
import data
import evaluate
import pqcl
from data import UsageError

# --------------------------------------------------------------------------------------
# Command line: every pqcl.Config field is a flag, its metadata the help
# --------------------------------------------------------------------------------------


def build_parser():
    parser = data.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--data",
                     help="an ImageFolder tree, or a built-in set: 'embedded' (generated shapes, the default) "
                          "or 'fashion-mnist' (apt-get install -y dataset-fashion-mnist)")
    run.add_argument("--preset", choices=sorted(data.PRESETS),
                     help="the method flags' defaults: 'recipe' (the authors' ViT-S/16 ImageNet recipe) or a "
                          "built-in set's CPU preset (default: the built-in set's own, the recipe for a folder)")
    run.add_argument("--subset", type=int, help="pretrain on the first N images only (default 0: all)")
    run.add_argument("--output-dir", default="runs/embedded",
                     help="checkpoint.pth, log.jsonl, backbone.pth, eval.json; a folder that holds a checkpoint "
                          "resumes it (flags that would change the run are refused)")
    run.add_argument("--resume", action="store_true",
                     help="insist on resuming: exit 2 when <output-dir> holds no checkpoint")
    run.add_argument("--fresh", action="store_true",
                     help="start over: the old run's files move into <output-dir>/previous-<date>-<time>/")
    run.add_argument("--keep-every", type=int, default=0, metavar="EPOCHS",
                     help="also keep checkpoint-epochNNNN.pth every this many epochs (0: the latest only)")
    run.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: run all epochs)")
    run.add_argument("--ckpt-every", type=int, default=500, help="also write the checkpoint every this many steps")
    run.add_argument("--log-every", type=int, default=20, help="steps between log lines (and loss/stop checks)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="autocast precision; auto = bf16 on a GPU; on a CPU bf16 where a matmul at the model's "
                          "width runs faster in bf16 than in fp32 (timed at start, printed in the start line)")
    run.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks and heads")
    run.add_argument("--workers", type=int, default=-1,
                     help="data-loading processes per GPU/process (-1: the node's cores shared among its processes, one "
                          "left to each for training). Augmentation bounds GPU training: bench.py measures the images/s of one worker")
    run.add_argument("--augment-on", choices=("cpu", "device"),
                     help="where colour jitter, grayscale, blur, solarisation and normalisation run (default: "
                          "device on a GPU and for the built-in sets, cpu for a folder on a CPU). device: the workers "
                          "only decode and crop, and return uint8 views with every random parameter drawn for them "
                          "(the same draws on any device); the photometric ops then run batched on the training "
                          "device, so far fewer workers keep a GPU fed, and small in-memory images are not augmented "
                          "op by op. The two paths draw the same distributions but not the same pixels: a run keeps "
                          "the path it started with")
    run.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                     help="after training on a built-in set, k-NN of the teacher vs a random init on its test split")
    run.add_argument("--knn-data",
                     help="k-NN monitor: a built-in set (its test split) or ROOT with train/ and val/ ImageFolder "
                          "trees, e.g. a per-class subset of ImageNet (README); needs --knn-every")
    run.add_argument("--knn-every", type=int, default=0,
                     help="every this many epochs, the teacher's k-NN top-1 (k 20) on --knn-data, in log.jsonl as "
                          "knn_top1 (0: off, the default)")
    run.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"),
                     help="write the teacher backbone of CKPT to OUT (timm names) and exit")
    method = parser.add_argument_group("method (pqcl.Config; defaults from --preset)")
    embedded = data.PRESETS["embedded"]
    for field in dataclasses.fields(pqcl.Config):
        flag, default = "--" + field.name.replace("_", "-"), field.default
        preset_note = f"; embedded preset: {embedded[field.name]}" if field.name in embedded else ""
        kwargs = dict(default=None, help=f"{field.metadata['help']} (recipe: {default}{preset_note})")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(nargs=len(default), type=float, metavar=("MIN", "MAX"))
        else:
            kwargs["type"] = type(default)
        method.add_argument(flag, **kwargs)
    return parser


DEFAULT_RUN = {"data": "embedded", "subset": 0, "preset": None, "augment_on": None}  # the RUN_SETTINGS' defaults


def preset_of(args):
    return args.preset or data.default_preset(args.data or DEFAULT_RUN["data"])


def method_flags_given(args):
    """{pqcl.Config field: value} of the method flags on the command line (the rest are None)."""
    return {f.name: tuple(v) if isinstance(v, list) else v for f in dataclasses.fields(pqcl.Config)
            if (v := getattr(args, f.name)) is not None}


def run_settings_given(args):
    """{name: value} of the checkpoints.RUN_SETTINGS on the command line, a folder as its absolute path."""
    given = {name: value for name in checkpoints.RUN_SETTINGS if (value := getattr(args, name)) is not None}
    if given.get("data", "embedded") not in data.BUILTIN_DATASETS:
        given["data"] = os.path.abspath(given["data"])
    return given


def config_from_args(args):
    """The preset's Config with every method flag given on top."""
    try:
        return data.preset_config(preset_of(args), **method_flags_given(args))
    except ValueError as error:
        name, _, fix = str(error).partition(": ")
        raise UsageError(f"--{name.replace('_', '-')}: {fix}") from None


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


def schedule_at(cfg, step, steps_per_epoch, world_size=1):
    """Every scheduled value of global step `step` (pqcl.py's pure schedules), computed once:
    the step uses them and the log reports them."""
    return {"lr": pqcl.learning_rate(cfg, step, steps_per_epoch, world_size),
            "weight_decay": pqcl.weight_decay(cfg, step, steps_per_epoch),
            "momentum": pqcl.teacher_momentum(cfg, step, steps_per_epoch),
            "teacher_temp": pqcl.teacher_temperature(cfg, step, steps_per_epoch),
            "freeze_last_layer": step < cfg.freeze_last_layer_epochs * steps_per_epoch}


def train_step(model, optimizer, batch, schedule, amp_dtype=None, scaler=None, monitor=False):
    """One optimizer step of PQCL with the values of `schedule` (schedule_at): forward under
    autocast, backward, per-tensor grad clip, last-layer freeze, AdamW, EMA. `model` is the
    PQCL module or its DDP wrapper. Returns the loss terms, and with `monitor` the collapse
    monitors of PQCL.forward (tensors: nothing here waits for the device)."""
    pqcl_model = model.module if isinstance(model, DistributedDataParallel) else model
    for group in optimizer.param_groups:
        group["lr"] = schedule["lr"]
    optimizer.param_groups[0]["weight_decay"] = schedule["weight_decay"]  # group 1: biases and norms, never decayed
    device_type = batch["globals"].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        terms = model(batch, teacher_temp=schedule["teacher_temp"], monitor=monitor)
    if scaler is not None:
        scaler.scale(terms["loss"]).backward()
        scaler.unscale_(optimizer)
    else:
        terms["loss"].backward()
    if pqcl_model.cfg.clip_grad:  # 0 = no clipping, as DINO's `if args.clip_grad`
        grads = [p.grad for p in pqcl_model.student.parameters() if p.grad is not None]
        norms = torch._foreach_norm(grads)  # DINO clips each parameter tensor on its own
        torch._foreach_mul_(grads, [torch.clamp(pqcl_model.cfg.clip_grad / (n + 1e-6), max=1.0) for n in norms])
    if schedule["freeze_last_layer"]:
        for name, p in pqcl_model.student.named_parameters():
            if "last_layer" in name:
                p.grad = None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pqcl_model.update_teacher(schedule["momentum"])
    return {k: v.detach() for k, v in terms.items()}


# --------------------------------------------------------------------------------------
# Training run
# --------------------------------------------------------------------------------------


def fastest_seconds(operations, min_seconds=0.05, min_repeats=5):
    """{name: fastest seconds of operations[name]()} on one CPU thread. The operations take turns
    until each has `min_repeats` timings and the probe has run `min_seconds`; the minimum is
    kept, since another process on the core only ever adds time, and the turns keep a busy spell
    from falling on one operation only (a median of three in a row picked fp32 at 0.08x beside a
    git commit on a CPU where bf16 makes the step 1.67x). One thread, because a multi-threaded
    op waits at its barrier for whichever thread a busy core has descheduled, so that no timing
    is clean (beside a 2-thread matmul loop on 2 cores both dtypes took 4 to 8 ms on 2 threads,
    against 0.21 and 0.06 ms idle; on one thread 0.39 and 0.10 ms, as idle); a core's bf16 /
    fp32 ratio is the step's on any number of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run in operations.values():  # warm-up: the first call of a shape may build its kernel
            run()
        fastest, repeats, probe_start = dict.fromkeys(operations, math.inf), 0, time.perf_counter()
        while repeats < min_repeats or time.perf_counter() - probe_start < min_seconds:
            for name, run in operations.items():
                start = time.perf_counter()
                run()
                fastest[name] = min(fastest[name], time.perf_counter() - start)
            repeats += 1
    finally:
        torch.set_num_threads(threads)
    return fastest


def matmul_seconds(width, dtypes):
    """{dtype: fastest seconds of one (tokens, width) @ (width, 4 width) matmul on one CPU thread}:
    the MLP's shape, the bulk of a ViT's FLOPs; 2^25 multiply-adds, so that even emulated bf16
    answers in milliseconds."""
    tokens = max(16, 2**25 // (4 * width * width))
    operands = {dtype: (torch.randn(tokens, width, dtype=dtype), torch.randn(width, 4 * width, dtype=dtype))
                for dtype in dtypes}
    return fastest_seconds({dtype: lambda a=a, b=b: torch.mm(a, b) for dtype, (a, b) in operands.items()})


def attention_seconds(heads, head_dim, tokens):
    """{"sdpa": s, "matmul": s}: fastest seconds of F.scaled_dot_product_attention and of
    pqcl.matmul_attention, forward and backward under bf16 autocast on one CPU thread, over
    (n, heads, tokens, head_dim) bf16 with n images for about 2^22 multiply-adds forward."""
    n = max(1, 2**22 // (2 * heads * tokens * tokens * head_dim))
    qkv = [torch.randn(n, heads, tokens, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]

    def forward_backward(attend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attend(*qkv)
        out.float().sum().backward()

    return fastest_seconds({"sdpa": lambda: forward_backward(F.scaled_dot_product_attention),
                            "matmul": lambda: forward_backward(pqcl.matmul_attention)})


def auto_precision(device, width):
    """--precision auto -> (precision, why). bf16 on CUDA. On a CPU bf16 only where the matmul
    probe runs faster in bf16 than in fp32: CPUs with native bf16 (AMX, avx512_bf16) gain,
    others emulate it and lose (1.47x and 0.63x the fp32 step measured on two machines)."""
    if device.type == "cuda":
        return "bf16", "GPU"
    seconds = matmul_seconds(width, (torch.float32, torch.bfloat16))
    fp32, bf16 = seconds[torch.float32], seconds[torch.bfloat16]
    return ("bf16" if bf16 < fp32 else "fp32"), f"bf16 matmul {fp32 / bf16:.2f}x fp32"


def cpu_attention(cfg):
    """How a bf16 run on a CPU computes attention (pqcl.Attention.attend) -> (function, why):
    pqcl.matmul_attention where the probe at the model's heads and sequence length runs it
    faster than torch's SDPA, else F.scaled_dot_product_attention. (At 65 tokens on a Zen 4
    EPYC the embedded preset's bf16 step ran 1.19x faster with it.) An fp32 run keeps SDPA:
    there the two are about as fast, and the choice would flip with the probe's noise."""
    width, _, heads = pqcl.ARCHS[cfg.arch]
    seconds = attention_seconds(heads, width // heads, 1 + (cfg.img_size // cfg.patch_size) ** 2)
    speedup = seconds["sdpa"] / seconds["matmul"]
    if speedup > 1:
        return pqcl.matmul_attention, f"attention as two matmuls, {speedup:.2f}x SDPA"
    return F.scaled_dot_product_attention, f"attention by SDPA, {1 / speedup:.2f}x the matmuls"


def set_attention(model, attend):
    """Every pqcl.Attention of `model` (student and teacher) computes attention with `attend`."""
    for module in model.modules():
        if isinstance(module, pqcl.Attention):
            module.attend = attend


def setup_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python runs one process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        shared_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if shared_agent_store and os.environ.get("GROUP_WORLD_SIZE") == "1":
            # torchrun's agent keeps one store for every attempt and does not scope it per restart
            # (pytorch/pytorch#135712): a restarted worker can read the address a dead worker of the
            # last attempt published and fail to connect. Under one agent every worker has the same
            # restart count, so it names the attempt; several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
            agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                        is_master=False)
            attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
            dist.init_process_group(backend, store=dist.PrefixStore(f"pqcl/attempt{attempt}/", agent_store),
                                    rank=int(os.environ["RANK"]), world_size=world_size)
        else:
            dist.init_process_group(backend)
            if dist.get_rank() == 0 and shared_agent_store and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
                print("train_ddp.py: warning: restarts across several nodes can fail to connect with torchrun's shared "
                      "store; start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch/pytorch#135712)",
                      file=sys.stderr, flush=True)
    return dist.get_rank() if world_size > 1 else 0, world_size, device


def all_ranks_sum(values):
    """{name: scalar tensor} -> {name: float}, each summed over all ranks in one all-reduce."""
    totals = torch.stack([value.float() for value in values.values()])
    if dist.is_initialized():
        dist.all_reduce(totals)
    return dict(zip(values, totals.tolist()))


def global_batch_rank(local_embeddings):
    """The effective rank (pqcl.effective_rank) of the teacher's [CLS] embeddings (n, D) of
    every rank's batch together."""
    if dist.is_initialized():
        gathered = torch.empty(dist.get_world_size() * len(local_embeddings), local_embeddings.shape[1],
                               dtype=local_embeddings.dtype, device=local_embeddings.device)
        dist.all_gather_into_tensor(gathered, local_embeddings.contiguous())
        local_embeddings = gathered
    return pqcl.effective_rank(local_embeddings).item()


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


class DataWait:
    """The seconds the loop spent blocked on the loader since the last log (the "data" time of
    DINO's logs): near 0 the workers keep up; a large share of the step means the device waits
    on data (more --workers, or --augment-on device)."""

    def __init__(self):
        self.seconds = 0.0

    def batches(self, loader):
        """loader's batches, each one's wait added to self.seconds."""
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return
            self.seconds += time.perf_counter() - start
            yield batch

    def take(self):
        """The seconds since the last take."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


LOSS_TERMS = ("loss", "cls", "patch", "query", "koleo")
MONITORED = ("cls", "patch", "query", "local")  # terms with collapse monitors (PQCL.collapse_monitors)


class Progress:
    """Rank 0's log: one JSON object per interval in log.jsonl and a live line on stdout."""

    def __init__(self, output_dir, total_steps, start_step, global_batch):
        self.file = open(os.path.join(output_dir, "log.jsonl"), "a")
        self.total_steps, self.start_step, self.global_batch = total_steps, start_step, global_batch
        self.interactive = sys.stdout.isatty()
        self.run_start = self.interval_start = time.perf_counter()
        self.skipped = 0

    def write(self, step, epoch, losses, monitors, skipped, interval_steps, schedule, student_temp, peak_memory,
              data_wait):
        """`losses`: the interval's mean loss terms; `monitors`: what was measured at its last
        step (the collapse monitors entropy_T, kl_T, effective_rank; knn_top1 if it was run);
        `schedule`: the values of its last step; `data_wait`: its seconds blocked on the loader."""
        now = time.perf_counter()
        step_time = (now - self.interval_start) / interval_steps
        self.interval_start, self.skipped = now, self.skipped + skipped
        record = {"step": step, "epoch": epoch, **losses, **monitors, "lr": schedule["lr"],
                  "weight_decay": schedule["weight_decay"],
                  "momentum": schedule["momentum"], "teacher_temp": schedule["teacher_temp"],
                  "student_temp": student_temp, "images_per_s": self.global_batch / step_time,
                  "step_time_s": step_time, "data_wait_s": data_wait / interval_steps, "peak_memory_mb": peak_memory,
                  "skipped_images": self.skipped}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        eta = (now - self.run_start) / (step - self.start_step) * (self.total_steps - step)
        line = (f"step {step}/{self.total_steps} ep {epoch} | loss {losses['loss']:.3f} (cls {losses['cls']:.3f} "
                f"patch {losses['patch']:.3f} query {losses['query']:.3f}"
                + (f" koleo {losses['koleo']:.3f}" if losses["koleo"] else "") + ") | "
                + "".join(f"H(t)/KL {term} {monitors[f'entropy_{term}']:.2f}/{monitors[f'kl_{term}']:.2f} | "
                          for term in MONITORED if f"entropy_{term}" in monitors)
                + (f"rank {monitors['effective_rank']:.1f} | " if "effective_rank" in monitors else "")
                + (f"k-NN {monitors['knn_top1']:.1f} | " if "knn_top1" in monitors else "")
                + f"{record['images_per_s']:.1f} img/s, data wait {record['data_wait_s'] / step_time:.0%} | "
                f"ETA {format_duration(eta)}" + (f" | skipped {self.skipped} unreadable images" if self.skipped else ""))
        print(("\r" + line + "\033[K") if self.interactive else line, end="" if self.interactive else "\n", flush=True)

    def finish(self, step):
        self.file.close()
        print(("\n" if self.interactive else "")
              + f"trained {step - self.start_step} steps in {format_duration(time.perf_counter() - self.run_start)}"
              + (f"; skipped {self.skipped} unreadable images" if self.skipped else ""), flush=True)


def train(args, stop_requested):
    """Pretrain, or continue the run in args.output_dir; `stop_requested` turns non-empty on
    SIGTERM. -> (cfg, the built-in splits to evaluate on, or None)"""
    rank, world_size, device = setup_distributed()
    checkpoint_path = os.path.join(args.output_dir, "checkpoint.pth")
    backbone_path = os.path.join(args.output_dir, "backbone.pth")
    # everything that can fail on bad input happens before anything is written
    if args.fresh and args.resume:
        raise UsageError("--fresh starts over, --resume continues: pass one of them")
    # torchrun restarts failed workers with the same command line: --fresh is for its first attempt only
    fresh = args.fresh and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    checkpoint = checkpoints.load_checkpoint(checkpoint_path) if os.path.exists(checkpoint_path) and not fresh else None
    if args.resume and checkpoint is None:
        raise UsageError(f"--resume: {args.output_dir} holds no checkpoint.pth; drop --resume to start a new run")
    if checkpoint:
        given = {**method_flags_given(args), **run_settings_given(args)}
        cfg = checkpoints.resumed_config(checkpoint, given, world_size, args.output_dir)
    else:
        cfg = config_from_args(args)
    # what the run trains on: as recorded, or, for a new run (or one recorded before runs kept it), as given
    run = dict((checkpoint or {}).get("run") or {**DEFAULT_RUN, **run_settings_given(args), "preset": preset_of(args)})
    if not run.get("augment_on"):  # a new run, or one recorded before runs kept it (its default was cpu on a CPU)
        batched = device.type == "cuda" or (run["data"] in data.BUILTIN_DATASETS and not checkpoint)
        run["augment_on"] = args.augment_on or ("device" if batched else "cpu")
    precision, precision_why = args.precision, "--precision"
    if precision == "auto":
        precision, precision_why = auto_precision(device, pqcl.ARCHS[cfg.arch][0])
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a GPU (gradient scaling); use bf16 or fp32 on the CPU")
    if args.keep_every < 0:
        raise UsageError(f"--keep-every {args.keep_every}: pass a number of epochs, or 0 to keep the latest only")
    attend = F.scaled_dot_product_attention
    if device.type == "cpu" and precision == "bf16":
        attend, attention_why = cpu_attention(cfg)
        precision_why += f"; {attention_why}"
    augment_on = run["augment_on"]
    augment = data.augmentation(cfg, on=augment_on)
    if run["data"] in data.BUILTIN_DATASETS:
        splits = data.BUILTIN_DATASETS[run["data"]](cfg.seed, cfg.img_size)
        source = data.InMemoryImages(splits[0][0])
    else:
        splits, source = None, data.ImageFiles(run["data"], reduction=augment.draft_reduction)
    num_images = min(run["subset"], len(source)) if run["subset"] else len(source)  # the sampler draws from these
    sampler = data.ResumableSampler(num_images, cfg.batch_size, cfg.seed, rank, world_size)
    if sampler.steps_per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} x {world_size} processes exceeds the {num_images} "
                         "images; lower --batch-size")
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    step = checkpoint["step"] if checkpoint else 0
    if step >= total_steps:  # a rerun of a finished run (a scheduler's, a retyped command): touch nothing
        if rank == 0:
            print(f"{args.output_dir}: the run is done (step {step} of {total_steps}); nothing to do. A larger "
                  "--epochs or --max-steps continues it, --fresh starts a new one", flush=True)
            if not os.path.exists(backbone_path):  # killed between its last checkpoint and the export
                checkpoints.export_backbone(checkpoint_path, backbone_path)
        return cfg, None
    workers = args.workers if args.workers >= 0 else default_workers()

    torch.manual_seed(cfg.seed)
    model = pqcl.PQCL(cfg).to(device)
    optimizer = make_optimizer(model, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if checkpoint:
        checkpoints.restore(model, checkpoint, optimizer, scaler)
    set_attention(model, attend)
    if args.compile:
        compile_model(model)
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=False) if world_size > 1 else model
    dataset = data.Augmented(source, augment, cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers else None, worker_init_fn=data.leave_sigterm_to_the_main_process)

    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
        aside = checkpoints.move_aside(args.output_dir) if fresh else None
        checkpoints.log_until(os.path.join(args.output_dir, "log.jsonl"), step)
        if not checkpoint:
            begin = f"{preset_of(args)} preset" + (f"; the old run moved to {aside}" if aside else "")
        elif cfg.epochs > checkpoint["config"]["epochs"]:
            begin = (f"resuming at step {step} of {total_steps}, extended from {checkpoint['config']['epochs']} to "
                     f"{cfg.epochs} epochs: the schedules now run to step {cfg.epochs * steps_per_epoch}")
        else:
            begin = f"resuming at step {step} of {total_steps}"
        print(f"PQCL-{cfg.framework} ({f'lambda {cfg.query_weight}' if cfg.use_queries else 'baseline, no queries'}) "
              f"{cfg.arch}{f' depth {cfg.depth}' if cfg.depth else ''}/{cfg.patch_size} at {cfg.img_size} px on "
              f"{run['data']}: {num_images} images, {world_size} x {device.type}, "
              f"{precision} ({precision_why}), augmentation on {augment_on}, "
              f"global batch {cfg.batch_size * world_size}, {total_steps} steps, {begin}", flush=True)
    log = Progress(args.output_dir, total_steps, step, cfg.batch_size * world_size) if rank == 0 else None
    running = dict.fromkeys([*LOSS_TERMS, "skipped"], torch.zeros((), device=device))  # sums since the last sync
    interval_steps, data_wait = 0, DataWait()

    epoch = step // steps_per_epoch
    while step < total_steps:
        sampler.set_position(epoch, step - epoch * steps_per_epoch)
        for batch in data_wait.batches(loader):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if augment_on == "device":
                batch = augment.photometric(batch)  # the views' photometry, batched, with the drawn parameters
            torch.manual_seed(cfg.seed * 1_000_003 + rank * 10_007 + step)  # drop path: a function of the step
            schedule = schedule_at(cfg, step, steps_per_epoch, world_size)
            step += 1
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            log_now = step % args.log_every == 0 or end_of_epoch
            save_now = step % args.ckpt_every == 0 or end_of_epoch
            terms = train_step(trained, optimizer, batch, schedule, amp_dtype, scaler, monitor=log_now)
            interval_steps += 1
            running = {name: total + (batch["skipped"].sum() if name == "skipped" else terms[name])
                       for name, total in running.items()}
            if not (log_now or save_now or (stop_requested and world_size == 1)):
                continue
            # sync point: every rank agrees on the loss, finiteness and a pending SIGTERM
            if device.type == "cpu":
                release_freed_memory()
            weights_finite = torch.stack(torch._foreach_norm(list(model.student.parameters()))).isfinite().all()
            monitors = {name: value for name, value in terms.items() if name.startswith(("entropy_", "kl_"))}
            totals = all_ranks_sum({**running, **monitors, "nonfinite_weights": ~weights_finite,
                                    "stop": torch.tensor(float(bool(stop_requested)), device=device)})
            if not all(map(math.isfinite, (totals[name] for name in LOSS_TERMS))) or totals["nonfinite_weights"]:
                raise FloatingPointError(f"non-finite loss or weights near step {step}; the last good checkpoint in "
                                         f"{args.output_dir} is untouched. Lower --lr or use --precision fp32.")
            stop = totals["stop"] > 0
            if log_now or stop:  # the monitors come from log steps only
                monitors = {name: totals[name] / world_size for name in monitors}
                if log_now:
                    monitors["effective_rank"] = global_batch_rank(terms["teacher_cls_tokens"])
                if args.knn_every and step % (args.knn_every * steps_per_epoch) == 0:  # all ranks extract
                    monitors["knn_top1"] = evaluate.knn_monitor(model.teacher.backbone, args.knn_data, cfg.img_size,
                                                                cfg.seed, workers)
                waited = data_wait.take()
                if log is not None:
                    means = {name: totals[name] / (interval_steps * world_size) for name in LOSS_TERMS}
                    log.write(step, epoch, means, monitors, int(totals["skipped"]), interval_steps, schedule,
                              cfg.student_temp, peak_memory_mb(device), waited)
                running = {name: torch.zeros_like(total) for name, total in running.items()}
                interval_steps = 0
            if (save_now or stop) and rank == 0:
                state = checkpoints.training_state(model, optimizer, scaler, run, step // steps_per_epoch, step,
                                                   world_size)
                checkpoints.save_atomic(state, checkpoint_path)
                if args.keep_every and step % (args.keep_every * steps_per_epoch) == 0:
                    checkpoints.save_atomic(state, os.path.join(args.output_dir,
                                                                f"checkpoint-epoch{step // steps_per_epoch:04d}.pth"))
            if stop:
                if rank == 0:
                    print(f"\nstopped by SIGTERM at step {step}; rerun the same command to continue", flush=True)
                return cfg, None
            if step >= total_steps:
                break
        epoch += 1
    if rank == 0:
        log.finish(step)
        checkpoints.export_backbone(checkpoint_path, backbone_path)
    return cfg, splits


def check_knn_flags(args):
    """--knn-every and --knn-data go together; a ROOT must hold matching train/ and val/."""
    if args.knn_every < 0 or bool(args.knn_every) != bool(args.knn_data):
        raise UsageError("--knn-every EPOCHS (at least 1) and --knn-data ROOT go together; give both or neither")
    if args.knn_data and args.knn_data not in data.BUILTIN_DATASETS:
        data.image_folder_splits(args.knn_data, "--knn-data")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        check_knn_flags(args)
        if args.export:
            checkpoints.export_backbone(*args.export)
            print(f"wrote the teacher backbone of {args.export[0]} to {args.export[1]}")
            return 0
        stop_requested = []  # preemption: save at the next sync point and exit cleanly
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
        try:
            cfg, splits = train(args, stop_requested)
        finally:
            signal.signal(signal.SIGTERM, previous_handler)
        if splits is not None and args.eval and (not dist.is_initialized() or dist.get_rank() == 0):
            start = time.perf_counter()
            backbone, _ = checkpoints.backbone_from_checkpoint(os.path.join(args.output_dir, "backbone.pth"))
            result = evaluate.knn_against_random_init(cfg, splits, backbone)
            checkpoints.save_atomic_json(result, os.path.join(args.output_dir, "eval.json"))
            print(f"k-NN top-1 on the held-out split (k={result['k']}, T={result['temperature']}): trained teacher "
                  f"{result['knn_top1']:.1f}% | random init {result['knn_top1_random_init']:.1f}% "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
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
