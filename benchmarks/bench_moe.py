"""Wall time of the moe chapter's estimation-rate simulation, vectorised over replications against one fit at a time.

The default grid is `MoERateConfig.small()`: 7 sample sizes from 1e3 to 1e5, 8 replications, and the linear,
cosine and perturbed routers. The script runs `rate_experiment` over it twice in the same process. The first
run fits all replications of a sample size together; the second fits them one by one and is the anchor. It
prints both wall and CPU times, the speed-ups, and the largest difference between the two runs' metrics. That
difference stays far below the estimation errors because each replication keeps its own optimiser state.

    python benchmarks/bench_moe.py                   # full default grid
    python benchmarks/bench_moe.py --ns 1000 4000 --reps 4   # a quick check
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from alignbook.moe import METRICS, MoERateConfig, rate_experiment


def run_grid(config: MoERateConfig, vectorize: bool) -> tuple[float, float, dict]:
    "Return the wall time, the process CPU time (all threads) and the results of every router."
    wall, cpu = time.perf_counter(), time.process_time()
    results = {router: rate_experiment(config, router, vectorize=vectorize, progress=False) for router in config.routers}
    return time.perf_counter() - wall, time.process_time() - cpu, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=None, help="sample sizes (default: the small preset's 7 sizes)")
    parser.add_argument("--reps", type=int, default=None, help="replications per sample size (default: 8)")
    parser.add_argument("--optimizer", default="lm", help="lm, lbfgs or adam (default: lm)")
    args = parser.parse_args()

    overrides = {"optimizer": args.optimizer, "n_boot": 200}
    if args.ns:
        overrides["ns"] = tuple(args.ns)
    if args.reps:
        overrides["reps"] = args.reps
    config = MoERateConfig.small(**overrides)
    print(f"grid: ns={config.ns}, reps={config.reps}, routers={config.routers}, optimizer={config.optimizer}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

    vec_wall, vec_cpu, vec = run_grid(config, vectorize=True)
    print(f"vectorised over replications: wall {vec_wall:8.1f} s, CPU {vec_cpu:8.1f} s")
    loop_wall, loop_cpu, loop = run_grid(config, vectorize=False)
    print(f"one replication at a time:    wall {loop_wall:8.1f} s, CPU {loop_cpu:8.1f} s  (anchor)")
    # On a shared machine the wall time depends on the load; the CPU-time ratio is the steadier number.
    print(f"speed-up of the vectorised fit: wall {loop_wall / vec_wall:.2f}x, CPU {loop_cpu / vec_cpu:.2f}x")

    diff = max(float(np.nanmax(np.abs(vec[r][m] - loop[r][m]))) for r in config.routers for m in METRICS)
    print(f"max |vectorised - one-by-one| over all metrics: {diff:.2e}")
    for router, res in vec.items():
        slopes = ", ".join(f"{m} {res['rates'][m][0]:+.2f}" for m in METRICS)
        print(f"  {router:9s} {res['seconds']:6.1f} s, slopes: {slopes}, failed fits: {int(res['failed'].sum())}")


if __name__ == "__main__":
    main()
