"""The quick main job on a quiet machine and beside processes that load every core.

python benchmarks/busy_machine.py --out benchmarks/results/busy_machine.json

Runs `scripts/train_ppo.py --quick --controller-ms 1.0` (a fixed charge: the work is the same each run)
three ways, each in its own process and timed end to end: with the scripts' default of one torch thread
on an otherwise quiet machine; with one thread while `--load` busy-looping processes (default: one per
core) compete for the cores; and, for contrast, with one thread per core (torch's and OpenBLAS's own
default) under the same load. The claim checked: one thread under load stays within 2x of its quiet time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def run_job(threads: int | None, out: Path, extra: list[str]) -> float:
    """Seconds of one quick main job in a fresh process (`threads` None: torch's default, one per core)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "scripts/train_ppo.py", "--quick", "--controller-ms", "1.0", "--out", str(out), *extra]
    cmd += ["--threads", str(threads if threads is not None else os.cpu_count())]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=int, default=os.cpu_count(), help="busy-looping processes while loaded")
    ap.add_argument("--skip-default", action="store_true", help="skip torch's default threads under load")
    ap.add_argument("--out", type=Path, help="write the timings as JSON here")
    ap.add_argument("extra", nargs="*", help="further train_ppo.py flags (after --)")
    args = ap.parse_args(argv)
    result = {"cores": os.cpu_count(), "load_processes": args.load, "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        result["quiet_1_thread_s"] = run_job(1, Path(tmp) / "quiet", args.extra)
        print(f"quiet, 1 thread: {result['quiet_1_thread_s']:.1f} s", flush=True)
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.load)]
        for p in spinners:
            p.start()
        try:
            result["loaded_1_thread_s"] = run_job(1, Path(tmp) / "loaded", args.extra)
            print(f"loaded, 1 thread: {result['loaded_1_thread_s']:.1f} s", flush=True)
            if not args.skip_default:
                result["loaded_default_threads_s"] = run_job(None, Path(tmp) / "loaded_default", args.extra)
                print(f"loaded, {os.cpu_count()} threads: {result['loaded_default_threads_s']:.1f} s", flush=True)
        finally:
            stop.set()
            for p in spinners:
                p.join()
    result["loaded_over_quiet"] = result["loaded_1_thread_s"] / result["quiet_1_thread_s"]
    result["within_2x"] = result["loaded_over_quiet"] <= 2.0
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
