#!/usr/bin/env python3
"""Writes bench-results/export-job.md from scripts/check-job.sh's results (stdout)."""
import json
import platform
import subprocess
import sys
from datetime import date


def cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def secs(x):
    return "–" if x is None else f"{x:.0f} s"


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    modules = sys.argv[2] if len(sys.argv) > 2 else ""
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    print("# The distributed hand-off: export-job → accelerate → import-run\n")
    print(f"`scripts/check-job.sh`, {date.today()}, CPU: {cpu()} ({cores} cores, shared with "
          "another engineer's builds, so wall times are indicative). The job ran with the PyTorch "
          "peer (torch, transformers, PEFT, accelerate of `requirements.txt`), two processes "
          "joined by gloo (`accelerate launch --multi_gpu --num_processes 2 train.py --cpu "
          "--threads 1`) and one process (`--threads 2`); peft-studio trained the same preset "
          "with the same overrides (2 threads). Accuracy: the job's own evaluation on the run's "
          "held-out split (written to metrics.jsonl and imported), peft-studio's re-evaluation "
          "of the imported adapter (`import-run --verify`), and the local peft-studio run.\n")
    print("| preset | steps | job, 2 processes | job, 1 process | peft-studio | accuracy: job (2 proc) | "
          "imported, re-evaluated by peft-studio | job (1 proc) | peft-studio | Δ job − local |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        d = None if r.get("local_acc") is None else 100 * (r["job2_acc"] - r["local_acc"])
        print(f"| {r['name']} | {r['steps']} | {secs(r['job2_wall'])} ({r['job2_secs_per_step']:.2f} s/step) | "
              f"{secs(r.get('job1_wall'))} | {secs(r['local_wall'])} ({r['local_secs_per_step']:.2f} s/step) | "
              f"{pct(r['job2_acc'])} | {pct(r.get('imported_verify_acc'))} | {pct(r.get('job1_acc'))} | "
              f"{pct(r['local_acc'])} | {'–' if d is None else f'{d:+.1f} pt'} |")
    print()
    for r in rows:
        print(f"- {r['name']}: trainable values, job {r['trainable_job']:,} vs peft-studio "
              f"{r['trainable_local']:,}.", end="")
        if "imported_answer" in r:
            print(f" Exact match at step 0 (base model) {pct(r['job2_acc_step0'])}; the imported "
                  f"adapter loads in peft-studio (`generate --adapter`), answering a spam e-mail "
                  f"with \"{r['imported_answer'].strip()}\".", end="")
        print()
    print("\nWall times are whole commands (model loading, data, evaluation and saving included); "
          "s/step is the training steps alone.\n")
    print("## SVFit and LoLDU: the job's PyTorch modules against peft-studio\n")
    print("`tests/job_modules.rs`: the same base weights and adapter values (z moved by ±30%, the "
          "trainable scale by 25%) through `assets/job/peft_studio_adapters.py` and through "
          "peft-studio, which loads the module's saved adapter and rebuilds its own factors:\n")
    print("```")
    print(modules.strip())
    print("```")


if __name__ == "__main__":
    main()
