"""Speed of alignbook.sliced against POT and against a measured physical bound, on identical inputs.

For each (n, d, K, dtype) the script times, in one process and on the same tensors and projection matrix:

* our `sliced_wasserstein` and POT's `ot.sliced_wasserstein_distance`, forward and forward + backward, with torch
  inputs, and forward with NumPy inputs;
* the bound: one projection GEMM of both point sets plus the fastest sort of both (K, n) projection matrices
  available here. The candidates are NumPy's `np.sort` on one thread, `np.sort` on row blocks in parallel, and
  `torch.sort`. The backward bound adds a second GEMM, because the gradient products have the projection's size;
* direction sampling: SW with uniform directions against RPSW with random-path directions, same K.

Every time is the median of `--repeats` runs after `--warmup` runs. Warm-up stops once it has taken `--budget`
seconds, and timing stops past `--budget` seconds once 3 runs are in. `--clock cpu` times process CPU time
instead of wall time. On a machine shared with other jobs, wall times of short calls include time spent
descheduled, and CPU time with `--threads 1` is the stable measure of work. Results print as a table:
milliseconds, bound / time (1.0 means at the bound), our speed-up over POT's faster backend, and RPSW's sampling
overhead over SW.

    python benchmarks/bench_sliced.py            # default grid, a few minutes on 2 idle CPU cores (estimate)
    python benchmarks/bench_sliced.py --threads 1 --clock cpu   # the same, stable on a shared machine
    python benchmarks/bench_sliced.py --full     # n in {1e3, 1e4, 1e5}, d in {3, 64, 784}, K in {10, 100, 1000}
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import numpy as np
import ot
import torch

from alignbook.sliced import _rows_in_parallel, rpsw, sliced_wasserstein

DEFAULT_GRID = [  # (n, d, K): a mid-size point where sorting dominates, then corners of the full grid
    (10_000, 64, 256),
    (1_000, 3, 100),
    (10_000, 3, 100),
    (10_000, 784, 100),
    (1_000, 64, 1000),
]
FULL_SIZES = {"n": (1_000, 10_000, 100_000), "d": (3, 64, 784), "K": (10, 100, 1000)}
MAX_POINTS_TIMES_DIM = 5 * 10**7  # skip rule for CPU memory: n * d above this is not run
MAX_POINTS_TIMES_DIRECTIONS = 10**8  # and neither is n * K above this


def median_time(function, warmup: int, repeats: int, budget: float, synchronize, clock=time.perf_counter) -> float:
    "Median time of `function()` in seconds on `clock`, after `warmup` calls; both loops stop early past `budget`."
    warmup_start = clock()
    for _ in range(warmup):
        function()
        synchronize()
        if clock() - warmup_start > budget:
            break
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        synchronize()
        times.append(clock() - start)
        if sum(times) > budget and len(times) >= 3:
            break
    return statistics.median(times)


def threaded_np_sort(rows: torch.Tensor) -> np.ndarray:
    "np.sort of row blocks on torch.get_num_threads() threads into a new array."
    array = rows.numpy()
    out = np.empty_like(array)

    def task(block: slice) -> None:
        out[block] = np.sort(array[block], axis=1)

    _rows_in_parallel(task, array.shape[0], array.size)
    return out


def sort_candidates(device: str) -> dict:
    "Row-sort routines to take the fastest of, each sorting a (K, n) tensor along rows."
    if device != "cpu":
        return {"torch.sort": lambda rows: torch.sort(rows, dim=1)}
    return {
        "np.sort": lambda rows: np.sort(rows.numpy(), axis=1),
        "np.sort threaded": threaded_np_sort,
        "torch.sort": lambda rows: torch.sort(rows, dim=1),
    }


def bench_config(n, d, n_proj, dtype, device, args) -> dict:
    "Time every implementation and the bound for one configuration; returns one table row."
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=dtype, device=device)
    Y = torch.randn(n, d, generator=g, dtype=dtype, device=device)
    proj = torch.randn(d, n_proj, generator=g, dtype=dtype, device=device)
    proj /= proj.norm(dim=0, keepdim=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    timer = lambda f: median_time(f, args.warmup, args.repeats, args.budget, sync, clock)
    row = {"n": n, "d": d, "K": n_proj, "dtype": str(dtype).replace("torch.", ""), "device": device}

    theta = proj.T.contiguous()
    U, V = theta @ X.T, theta @ Y.T
    row["gemm"] = timer(lambda: (theta @ X.T, theta @ Y.T))
    sorts = {name: timer(lambda f=f: (f(U), f(V))) for name, f in sort_candidates(device).items()}
    row["sort_best_name"] = min(sorts, key=sorts.get)
    row["sort_best"] = sorts[row["sort_best_name"]]
    row["bound_fwd"] = row["gemm"] + row["sort_best"]
    row["bound_fwd_bwd"] = 2 * row["gemm"] + row["sort_best"]

    ours = float(sliced_wasserstein(X, Y, projections=proj))
    pot = float(ot.sliced_wasserstein_distance(X, Y, projections=proj))
    if not np.isclose(ours, pot, rtol=1e-4 if dtype == torch.float32 else 1e-10):
        raise RuntimeError(f"ours {ours} and POT {pot} disagree at n={n}, d={d}, K={n_proj}, {dtype}")

    def backward_of(distance):
        Xg = X.detach().clone().requires_grad_(True)
        return lambda: distance(Xg, Y, projections=proj).backward()

    row["ours_fwd"] = timer(lambda: sliced_wasserstein(X, Y, projections=proj))
    row["ours_fwd_bwd"] = timer(backward_of(sliced_wasserstein))
    row["pot_torch_fwd"] = timer(lambda: ot.sliced_wasserstein_distance(X, Y, projections=proj))
    row["pot_torch_fwd_bwd"] = timer(backward_of(ot.sliced_wasserstein_distance))
    if device == "cpu":
        Xn, Yn, Pn = X.numpy(), Y.numpy(), proj.numpy()
        row["ours_numpy_fwd"] = timer(lambda: sliced_wasserstein(Xn, Yn, projections=Pn))
        row["pot_numpy_fwd"] = timer(lambda: ot.sliced_wasserstein_distance(Xn, Yn, projections=Pn))
    row["sw_sampled_fwd"] = timer(lambda: sliced_wasserstein(X, Y, n_projections=n_proj, seed=g))
    row["rpsw_sampled_fwd"] = timer(lambda: rpsw(X, Y, n_projections=n_proj, seed=g))

    pot_best = min(row["pot_torch_fwd"], row.get("pot_numpy_fwd", float("inf")))
    row["speedup_vs_pot_fwd"] = pot_best / row["ours_fwd"]
    row["speedup_vs_pot_fwd_bwd"] = row["pot_torch_fwd_bwd"] / row["ours_fwd_bwd"]
    row["bound_fraction_fwd"] = row["bound_fwd"] / row["ours_fwd"]
    row["bound_fraction_fwd_bwd"] = row["bound_fwd_bwd"] / row["ours_fwd_bwd"]
    row["rpsw_over_sw"] = row["rpsw_sampled_fwd"] / row["sw_sampled_fwd"]
    return row


def grid(args) -> list[tuple[int, int, int]]:
    if not args.full:
        return DEFAULT_GRID
    configs = itertools.product(FULL_SIZES["n"], FULL_SIZES["d"], FULL_SIZES["K"])
    return [(n, d, k) for n, d, k in configs
            if n * d <= MAX_POINTS_TIMES_DIM and n * k <= MAX_POINTS_TIMES_DIRECTIONS]


def print_table(rows: list[dict]) -> None:
    ms = lambda seconds: f"{1e3 * seconds:9.1f}"
    header = ("n", "d", "K", "dtype", "gemm", "sort*", "ours", "ours f+b", "POT t", "POT t f+b", "POT np",
              "bound/ours", "b/ours f+b", "x POT", "x POT f+b", "RPSW/SW")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([str(r["n"]), str(r["d"]), str(r["K"]), r["dtype"], ms(r["gemm"]), ms(r["sort_best"]),
                          ms(r["ours_fwd"]), ms(r["ours_fwd_bwd"]), ms(r["pot_torch_fwd"]), ms(r["pot_torch_fwd_bwd"]),
                          ms(r.get("pot_numpy_fwd", float("nan"))), f"{r['bound_fraction_fwd']:.2f}",
                          f"{r['bound_fraction_fwd_bwd']:.2f}", f"{r['speedup_vs_pot_fwd']:.1f}",
                          f"{r['speedup_vs_pot_fwd_bwd']:.1f}", f"{r['rpsw_over_sw']:.2f}"]))
    print("times in ms; sort* = fastest sort of both (K, n) matrices; bound = gemm + sort* (forward) and "
          "2 gemm + sort* (forward + backward); x POT = POT's faster backend time / ours")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="run the complete n x d x K grid (estimate: up to an hour on 2 CPU cores)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads and sort threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtypes", default="float32,float64", help="comma-separated torch dtypes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls, of which the median is reported")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds after which warm-up and timing of one measurement stop repeating")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: process CPU time summed over threads, which is stable on a "
                             "loaded machine and equals the work done when --threads 1")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for (n, d, k), name in itertools.product(grid(args), args.dtypes.split(",")):
        rows.append(bench_config(n, d, k, getattr(torch, name), args.device, args))
        print(json.dumps({key: round(v, 5) if isinstance(v, float) else v for key, v in rows[-1].items()}), flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
