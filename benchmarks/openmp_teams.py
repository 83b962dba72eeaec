"""Why ``mops-serve``'s engine does all of its tensor work on its own thread.

A decode step is hundreds of small parallel regions (a 4-row matrix product per weight).
libgomp lets a team's workers spin between regions while the process has no more OpenMP
threads than cores; past that it puts them to sleep at once, and every region pays a futex
sleep and wake-up. A second thread that has run one parallel region (the main thread, say)
keeps its own team alive, which is enough. This measures it in two fresh processes, one per
case: a worker thread times ``F.linear`` on 4 rows with a weight of the embedded model's MLP
shape (1536 x 576) and counts the process's voluntary context switches per call, either with
nothing else having run (``alone``) or after the main thread ran one parallel matrix product
(``main-team``).

    python benchmarks/openmp_teams.py        # prints a table; 2 idle cores for the timings
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

CASES = {"alone": "nothing else ran", "main-team": "the main thread ran one parallel matrix product first"}


def measure(case: str, threads: int, calls: int) -> tuple[float, float]:
    torch.set_num_threads(threads)
    if case == "main-team":
        torch.randn(512, 512) @ torch.randn(512, 512)
    weight, x, out = torch.randn(1536, 576), torch.randn(4, 576), {}

    def worker():
        torch.set_num_threads(threads)  # intra-op threads are per calling thread
        for _ in range(20):
            F.linear(x, weight)
        switches, began = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw, time.perf_counter()
        for _ in range(calls):
            F.linear(x, weight)
        out["us"] = (time.perf_counter() - began) / calls * 1e6
        out["switches"] = (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - switches) / calls

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    return out["us"], out["switches"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = p.parse_args(argv)
    if args.case:
        print(*measure(args.case, args.threads, args.calls))
        return
    print(f"F.linear, 4 x 576 by 576 x 1536, on a worker thread with {args.threads} intra-op threads "
          f"(each case a fresh process)\n")
    print("| case | us per call | voluntary context switches per call |\n| --- | ---: | ---: |")
    for case, text in CASES.items():
        found = subprocess.run([sys.executable, __file__, "--case", case, "--threads", str(args.threads),
                                "--calls", str(args.calls)], check=True, capture_output=True, text=True).stdout
        us, switches = map(float, found.split())
        print(f"| {text} | {us:.0f} | {switches:.2f} |")


if __name__ == "__main__":
    main()
