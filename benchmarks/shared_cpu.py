"""Two training runs on one CPU at once: what each costs the other, by thread setting.

    python benchmarks/shared_cpu.py [--steps 60] [--settings 0,2] [-- key=value ...]

Runs `nanovlm train` once alone and then twice at the same time, for each `threads=` setting
(0 is the default: the cores other programs leave free, followed during the run), on the
packaged easy-VQA data with the default preset's model and batch, the vision warm-up off and no
evaluation, so what is timed is training steps. Prints a markdown table: samples/s of each run
(the mean of its logged windows after the first) and the wall time of the pair. Run it alone on
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def start(out: str, threads: int, steps: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanovlm", "train", "--out", out, f"threads={threads}", "vision_warmup=off",
           "eval_task=none", "eval_interval=0", "max_train_time=0", f"max_training_steps={steps}", "save_interval=0",
           *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    log = open(out + ".log", "w")  # a file, not a pipe: a full pipe would stall a run
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def samples_per_s(out: str) -> float:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [r["samples_per_s"] for r in map(json.loads, f) if "samples_per_s" in r]
    return statistics.mean(rates[1:] or rates)


def notices(err: str) -> str:
    lines = [line for line in err.splitlines() if "threads" in line or "the CPU" in line]
    return "; ".join(dict.fromkeys(line.strip() for line in lines)) or "-"


def trial(root: str, threads: int, n: int, steps: int, extra: list[str]) -> tuple[list[float], float, str]:
    outs = [os.path.join(root, f"t{threads}-n{n}-{k}") for k in range(n)]
    t0 = time.perf_counter()
    procs = [start(o, threads, steps, extra) for o in outs]
    for p in procs:
        p.wait()
    errs = []
    for o in outs:
        with open(o + ".log") as f:
            errs.append(f.read())
    wall = time.perf_counter() - t0
    for p, e in zip(procs, errs):
        if p.returncode:
            raise SystemExit(f"a run failed:\n{e[-2000:]}")
    return [samples_per_s(o) for o in outs], wall, notices("\n".join(errs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--settings", default="0,2", help="threads= values to compare")
    ap.add_argument("extra", nargs="*", help="more key=value settings for every run")
    args = ap.parse_args()
    print("| threads= | runs at once | samples/s of each run | wall of the runs (s) | what the runs said |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        for threads in (int(t) for t in args.settings.split(",")):
            for n in (1, 2):
                rates, wall, said = trial(root, threads, n, args.steps, args.extra)
                print(f"| {threads} | {n} | {', '.join(f'{r:.1f}' for r in rates)} | {wall:.0f} | {said} |", flush=True)


if __name__ == "__main__":
    main()
