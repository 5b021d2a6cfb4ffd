"""The equal-budget comparison of PQCL against its baselines: pretrain, then probe, every row.

    python compare.py --seeds 0 1 2 --out results/    # the table (README: its run time)
    python compare.py --seeds 0 --steps 3 --out /tmp/smoke -- --batch-size 16   # a smoke test

Several invocations may share one --out, each with its own --datasets and --seeds (e.g. one
process per core with OMP_NUM_THREADS=1, the README's way of filling both cores); a last one
with every dataset and seed then finds every row done and writes the whole table.

DINO, iBOT, iBOT + query-as-local (the paper's fair baseline, Sec. 4.4), PQCL-DINO and PQCL-iBOT
(train_ddp.py --framework dino|ibot --query-weight 0|1 [--query-as-local])
with the same architecture, schedules and budget (each built-in set's preset, data.PRESETS,
read at run time), per seed the same data order and views, on the embedded dataset and
Fashion-MNIST; then every protocol of evaluate.py on each teacher, a random init and the raw
pixels. The budget is --steps optimizer steps per run, per dataset: the preset's epochs over the
first steps/epochs batches of the training split, so every schedule (warm-ups, cosine decays) runs
to its end. Runs are resumable: rerun the same command and finished pretrainings and
evaluations are skipped, an interrupted pretraining continues from its last checkpoint.
Arguments after `--` go to every pretraining run (e.g. `-- --batch-size 16`).
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import statistics
import sys
import time

import checkpoints
import data
import evaluate
import pqcl
import train_ddp
from data import UsageError

METHODS = {  # row -> train_ddp.py flags; everything else is shared
    "DINO": ["--framework", "dino", "--query-weight", "0"],
    "iBOT": ["--framework", "ibot", "--query-weight", "0"],
    "iBOT + query-as-local": ["--framework", "ibot", "--query-weight", "0", "--query-as-local"],  # paper Sec. 4.4
    "PQCL-DINO": ["--framework", "dino", "--query-weight", "1"],
    "PQCL-iBOT": ["--framework", "ibot", "--query-weight", "1"],
}
BASELINES = ("random init", "raw pixels")
PAIRED = {"PQCL-DINO": ("DINO",), "PQCL-iBOT": ("iBOT", "iBOT + query-as-local")}  # PQCL row -> its baselines
COLUMNS = {**evaluate.METRICS, "images_per_s": "pretrain img/s"}  # metric -> table header
# Optimizer steps per run: the embedded set's whole preset (2 epochs over its 6000 images: the default
# run's budget, where every method beats random init on every probe); Fashion-MNIST gets 936 steps
# (its preset's 3 epochs over 19968 images, a third of its whole run): its 4 x 4-patch random init is
# strong, and at the 128 steps of an earlier table every method's k-NN was below it. README: the
# table, its run time and how both cores were filled.
DEFAULT_STEPS = {"embedded": 186, "fashion-mnist": 936}
COMPARE_FLAGS = ("data", "seed", "framework", "query_weight", "query_as_local", "subset", "output_dir", "resume",
                 "fresh", "max_steps", "eval", "export")  # train_ddp.py settings the comparison sets itself


class PretrainingStopped(Exception):
    """A pretraining run failed or was stopped; carries train_ddp.py's exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def run_folder(out, dataset, row, seed):
    return os.path.join(out, dataset, re.sub(r"[^a-z0-9]+", "-", row.lower()), f"seed{seed}")


def pretrain(run_dir, dataset, seed, method_flags, subset, train_args):
    """One pretraining run of train_ddp.py in this process; it continues an interrupted one by itself."""
    argv = [*train_args, "--data", dataset, "--seed", str(seed), *method_flags, "--subset", str(subset),
            "--output-dir", run_dir, "--no-eval", "--log-every", "10"]
    status = train_ddp.main(argv)  # on SIGTERM it checkpoints, returns 0 and leaves no backbone.pth
    if status != 0:
        raise PretrainingStopped(f"pretraining {run_dir} failed (train_ddp.py exit {status}, reason above); "
                                 "fix it and rerun the same command to resume", status)
    if not os.path.exists(os.path.join(run_dir, "backbone.pth")):
        raise PretrainingStopped(f"pretraining {run_dir} was stopped; rerun the same command to resume", 1)


def row_backbone(row, run_dir, dataset, seed, cfg, subset, train_args, result):
    """The frozen backbone of one table row (None: raw pixels), pretrained first if it is a method
    whose run has not finished; records the run's throughput and config in `result`."""
    if row == "raw pixels":
        return None
    if row == "random init":
        return evaluate.random_backbone(dataclasses.replace(cfg, seed=seed))
    if not os.path.exists(os.path.join(run_dir, "backbone.pth")):
        start = time.perf_counter()
        pretrain(run_dir, dataset, seed, METHODS[row], subset, train_args)
        result["pretrain_s"] = time.perf_counter() - start  # this invocation's part of it
    result["images_per_s"] = median_images_per_s(run_dir)
    backbone, run_cfg = checkpoints.backbone_from_checkpoint(os.path.join(run_dir, "checkpoint.pth"))
    result["config"] = dataclasses.asdict(run_cfg)
    return backbone


def median_images_per_s(run_dir):
    """Pretraining throughput: the median over log.jsonl's intervals (robust to warm-up and resumes)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return statistics.median(json.loads(line)["images_per_s"] for line in f)


def mean_std(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def summarize(results):
    """{row: [evaluation per seed]} -> {row: {metric: {mean, std (sample, over seeds), values}}}."""
    return {row: {metric: mean_std([run[metric] for run in runs]) for metric in COLUMNS if metric in runs[0]}
            for row, runs in results.items()}


def paired_differences(results):
    """{row: [evaluation per seed]} -> {"PQCL row - baseline": {metric: {mean, std, se,
    beyond_noise, values}}}: per seed, the PQCL row's figure minus its baseline's (the same
    seed: the same data order, views and initialisation), then the mean and the sample std
    over seeds; beyond_noise when |mean| exceeds two standard errors (std / sqrt(seeds))."""
    differences = {}
    for row, baselines in PAIRED.items():
        for baseline in baselines:
            if row not in results or baseline not in results:
                continue
            per_metric = {}
            for metric in evaluate.METRICS:
                if metric not in results[row][0]:
                    continue
                values = [ours[metric] - theirs[metric] for ours, theirs in zip(results[row], results[baseline])]
                stats = mean_std(values)
                stats["se"] = stats["std"] / math.sqrt(len(values)) if stats["std"] is not None else None
                stats["beyond_noise"] = stats["se"] is not None and abs(stats["mean"]) > 2 * stats["se"]
                per_metric[metric] = stats
            differences[f"{row} - {baseline}"] = per_metric
    return differences


def markdown_table(summary, marked=None):
    """{row: {metric: stats}} -> a markdown table, mean +- std over seeds; a * after the cells
    whose stats[marked] is true."""
    columns = [metric for metric in COLUMNS if any(metric in metrics for metrics in summary.values())]

    def cell(stats):
        if stats is None:
            return "-"
        return (f"{stats['mean']:+.1f}" if marked else f"{stats['mean']:.1f}") + (
            f" ± {stats['std']:.1f}" if stats["std"] is not None else "") + ("*" if marked and stats[marked] else "")

    lines = ["| method | " + " | ".join(COLUMNS[c] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cell(metrics.get(c)) for c in columns) + " |"
              for row, metrics in summary.items()]
    return "\n".join(lines)


def check_settings(out, settings):
    """A dataset's results folder holds one budget: refuse to mix runs made with other settings."""
    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != settings:
            changed = ", ".join(k for k in settings if previous.get(k) != settings[k])
            raise UsageError(f"{out} holds a comparison made with other settings ({changed}); rerun with the same "
                             "flags to resume it, or pass another --out")
    else:
        os.makedirs(out, exist_ok=True)
        checkpoints.save_atomic_json(settings, path)


def compare(args, train_args, command):
    """Pretrain and evaluate every method, seed and dataset; write comparison.md and comparison.json."""
    start = time.perf_counter()
    configs = {dataset: preset_config(dataset, args.seeds[0], train_args) for dataset in args.datasets}
    settings = {dataset: {"steps": args.steps[dataset], "train_args": train_args, "train_images": args.train_images,
                          "test_images": args.test_images} for dataset in args.datasets}
    loaded = {}  # (dataset, seed) -> eval splits; the first seed's now, so a missing dataset fails before hours of work
    for dataset, cfg in configs.items():
        splits = data.BUILTIN_DATASETS[dataset](args.seeds[0], cfg.img_size)
        images_per_epoch = math.ceil(args.steps[dataset] / cfg.epochs) * cfg.batch_size
        if images_per_epoch > len(splits[0][0]):
            raise UsageError(f"--steps {dataset}={args.steps[dataset]}: {cfg.epochs} epochs of {images_per_epoch} "
                             f"images exceed the {len(splits[0][0])} training images of {dataset}; lower --steps "
                             "or pass more epochs after '--' (-- --epochs E)")
        loaded[dataset, args.seeds[0]] = evaluate.first(splits, args.train_images, args.test_images)
    for dataset in args.datasets:
        check_settings(os.path.join(args.out, dataset), settings[dataset])
    rows = [*METHODS, *BASELINES]
    total, done, resumed = len(args.datasets) * len(args.seeds) * len(rows), 0, 0
    results = {dataset: {row: [] for row in rows} for dataset in args.datasets}
    for dataset in args.datasets:
        cfg = configs[dataset]
        steps_per_epoch = math.ceil(args.steps[dataset] / cfg.epochs)
        subset = steps_per_epoch * cfg.batch_size  # images per epoch; the preset's epochs run in full
        for seed in args.seeds:
            splits = loaded.pop((dataset, seed), None)  # loaded once per (dataset, seed), when first needed
            for row in rows:
                done += 1
                run_dir = run_folder(args.out, dataset, row, seed)
                result_path = os.path.join(run_dir, "evaluation.json")
                elapsed = train_ddp.format_duration(time.perf_counter() - start)
                if os.path.exists(result_path):
                    with open(result_path) as f:
                        results[dataset][row].append(json.load(f))
                    resumed += 1
                    print(f"[{done}/{total} {elapsed}] {dataset} seed {seed} {row}: done before", flush=True)
                    continue
                print(f"[{done}/{total} {elapsed}] {dataset} seed {seed} {row}", flush=True)
                row_start = time.perf_counter()
                result = {"row": row, "data": dataset, "seed": seed}
                backbone = row_backbone(row, run_dir, dataset, seed, cfg, subset, train_args, result)
                if splits is None:
                    splits = evaluate.first(data.BUILTIN_DATASETS[dataset](seed, cfg.img_size), args.train_images,
                                   args.test_images)
                eval_start = time.perf_counter()
                result.update(evaluate.evaluate(backbone, cfg.patch_size, splits, evaluate.all_protocols(splits), seed))
                result.update(eval_s=time.perf_counter() - eval_start, train_images=len(splits[0][0]),
                              test_images=len(splits[1][0]))
                os.makedirs(run_dir, exist_ok=True)
                checkpoints.save_atomic_json(result, result_path)
                results[dataset][row].append(result)
                print(f"    {', '.join(f'{k} {result[k]:.1f}' for k in COLUMNS if k in result)} "
                      f"({train_ddp.format_duration(time.perf_counter() - row_start)})", flush=True)
    report = {"command": command, "date": datetime.date.today().isoformat(), "seeds": args.seeds,
              "settings": settings, "wall_s": time.perf_counter() - start, "rows_done_before": resumed,
              "rows_s": sum(run.get("pretrain_s", 0.0) + run["eval_s"]  # every invocation's pretraining + evaluation
                            for rows in results.values() for runs in rows.values() for run in runs),
              "configs": {dataset: dataclasses.asdict(cfg) for dataset, cfg in configs.items()},
              "results": {dataset: summarize(results[dataset]) for dataset in args.datasets},
              "paired_differences": {dataset: paired_differences(results[dataset]) for dataset in args.datasets}}
    write_report(report, args.out)
    return report


def write_report(report, out):
    """comparison.json, and comparison.md: the budget, then one table per dataset."""
    checkpoints.save_atomic_json(report, os.path.join(out, "comparison.json"))
    lines = [f"Equal-budget comparison, {report['date']}: `{report['command']}`", "",
             f"Mean ± sample std over seeds {', '.join(map(str, report['seeds']))}. Pretraining + evaluation of all "
             f"rows took {train_ddp.format_duration(report['rows_s'])}; this invocation "
             f"{train_ddp.format_duration(report['wall_s'])}"
             + (f" ({report['rows_done_before']} rows evaluated before)" if report["rows_done_before"] else "") + "."]
    for dataset, summary in report["results"].items():
        cfg = pqcl.Config(**report["configs"][dataset])
        steps_per_epoch = math.ceil(report["settings"][dataset]["steps"] / cfg.epochs)
        lines += ["", f"**{dataset}**: {cfg.arch} depth {cfg.depth or pqcl.ARCHS[cfg.arch][1]}, patch {cfg.patch_size}, "
                      f"{cfg.img_size} px; per run {cfg.epochs} epochs x {steps_per_epoch} steps of batch "
                      f"{cfg.batch_size} ({cfg.epochs * steps_per_epoch * cfg.batch_size} images seen)", "",
                  markdown_table(summary), "",
                  "Paired differences, seed by seed (mean ± std over seeds; * beyond two standard errors):", "",
                  markdown_table(report["paired_differences"][dataset], marked="beyond_noise")]
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def preset_config(dataset, seed, train_args):
    """The pqcl.Config that `train_ddp.py --data <dataset> --seed <seed> <train_args>` uses."""
    return train_ddp.config_from_args(train_ddp.build_parser().parse_args([*train_args, "--data", dataset,
                                                                           "--seed", str(seed)]))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def build_parser():
    parser = data.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_split_sizes(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=sorted(data.BUILTIN_DATASETS),
                        default=["embedded", "fashion-mnist"])
    parser.add_argument("--steps", nargs="+", default=[f"{d}={n}" for d, n in DEFAULT_STEPS.items()],
                        metavar="[DATASET=]N",
                        help="optimizer steps per pretraining run (same for every method), one figure for every "
                             "dataset or DATASET=N each: the preset's epochs over the first ceil(N / epochs) batches "
                             "of the training split (default: %(default)s)")
    parser.add_argument("--out", default="results", help="folder for the runs, comparison.md and comparison.json")
    return parser


def steps_per_dataset(given, datasets):
    """--steps' values ('N' for every dataset, or 'DATASET=N') -> {dataset: N} for `datasets`."""
    steps = {}
    for value in given:
        dataset, _, count = value.rpartition("=")
        if dataset and dataset not in data.BUILTIN_DATASETS:
            raise UsageError(f"--steps {value}: no dataset {dataset!r}; use one of {', '.join(data.BUILTIN_DATASETS)}")
        if not count.isdigit() or int(count) < 1:
            raise UsageError(f"--steps {value}: the number of steps must be an integer >= 1")
        steps.update({dataset: int(count)} if dataset else dict.fromkeys(datasets, int(count)))
    missing = [dataset for dataset in datasets if dataset not in steps]
    if missing:
        raise UsageError(f"--steps {' '.join(given)}: no budget for {', '.join(missing)}; add "
                         f"{' '.join(f'{d}=N' for d in missing)} or give one N for every dataset")
    return {dataset: steps[dataset] for dataset in datasets}


def check_args(args, train_args):
    evaluate.check_split_sizes(args)
    args.steps = steps_per_dataset(args.steps, args.datasets)
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated; give each once")
    parser = train_ddp.build_parser()
    given, defaults = parser.parse_args(train_args), parser.parse_args([])
    clash = ["--" + name.replace("_", "-") for name in COMPARE_FLAGS if getattr(given, name) != getattr(defaults, name)]
    if clash:
        raise UsageError(f"{', '.join(clash)} after '--': the comparison sets these itself; use its own flags")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own_args, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    try:
        args = build_parser().parse_args(own_args)
        check_args(args, train_args)
        compare(args, train_args, "python compare.py " + shlex.join(argv))
        return 0
    except UsageError as error:
        print(f"compare.py: error: {error}", file=sys.stderr)
        return 2
    except PretrainingStopped as error:
        print(f"compare.py: {error}", file=sys.stderr)
        return error.status


if __name__ == "__main__":
    sys.exit(main())
