"""Benchmark SFD: one-step sampling against the teacher's 50-step DDIM sampler, and an SFD iteration against SiD.

Both comparisons run on the same randomly initialised class-conditional UNet in the same process, so the printed
ratios do not depend on the machine's absolute speed. The first goal is one-step sampling at least 10x faster per
image than DDIM-50, which makes 50x more network evaluations. The second is an SFD iteration, which adds one forget
term to each update, costing less than twice a SiD iteration.

Usage: python benchmarks/bench_sfd.py [--batch 64] [--repeats 3] [--iters 5] [--threads 1]
"""

import argparse
import time

import torch

from alignbook.sfd import (OneStepGenerator, SFDConfig, SFDTrainer, VPSchedule, class_conditional_unet, ddim_sample,
                           sample_remaining_labels)

SAMPLING_GOAL = 10.0  # one-step vs DDIM-50 per-image speed-up the chapter promises
ITERATION_LIMIT = 2.0  # an SFD iteration should cost less than two SiD iterations


def best_time(fn, repeats: int) -> tuple[float, float]:
    "Run fn once to warm up, then return the best wall-clock and CPU seconds over repeats."
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per sampling call and per loss term")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best one is reported")
    parser.add_argument("--iters", type=int, default=5, help="training iterations per timed repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    schedule = VPSchedule()
    teacher = class_conditional_unet(block_out_channels=(32, 64), seed=0).eval()
    labels = sample_remaining_labels(args.batch, 0, 10, generator=torch.Generator().manual_seed(0))
    generator = OneStepGenerator(teacher, schedule).eval()
    z = torch.randn(args.batch, 1, 8, 8)

    def one_step():
        with torch.no_grad():
            generator(z, labels)

    def ddim():
        ddim_sample(teacher, labels, (1, 8, 8), schedule, 50, torch.Generator().manual_seed(0))

    one_wall, one_cpu = best_time(one_step, args.repeats)
    ddim_wall, ddim_cpu = best_time(ddim, args.repeats)
    print(f"sampling, batch {args.batch}, 8x8 UNet (32, 64), {args.threads} thread(s)")
    print(f"  DDIM-50 (anchor): {1e3 * ddim_wall / args.batch:.3f} ms/image wall, {1e3 * ddim_cpu / args.batch:.3f} CPU")
    print(f"  one-step:         {1e3 * one_wall / args.batch:.3f} ms/image wall, {1e3 * one_cpu / args.batch:.3f} CPU")
    speedup = ddim_wall / one_wall
    print(f"  speed-up: {speedup:.1f}x wall, {ddim_cpu / max(one_cpu, 1e-9):.1f}x CPU, network evaluations 50 vs 1 "
          f"(goal >= {SAMPLING_GOAL:.0f}x: {'met' if speedup >= SAMPLING_GOAL else 'NOT met'})")

    def iterations(lambda_forget):
        config = SFDConfig.small(batch_size=args.batch, lambda_forget_fake=lambda_forget,
                                 lambda_forget_gen=lambda_forget)
        trainer = SFDTrainer(teacher, config, schedule=schedule)
        return lambda: [trainer.step(sample_remaining_labels(args.batch, 0, 10, generator=trainer.rng))
                        for _ in range(args.iters)]

    sid_wall, sid_cpu = best_time(iterations(0.0), args.repeats)
    sfd_wall, sfd_cpu = best_time(iterations(1.0), args.repeats)
    ratio = sfd_wall / sid_wall
    print(f"training, batch {args.batch} per term, {args.iters} iterations per repeat")
    print(f"  SiD iteration (anchor): {1e3 * sid_wall / args.iters:.1f} ms wall, {1e3 * sid_cpu / args.iters:.1f} ms CPU")
    print(f"  SFD iteration:          {1e3 * sfd_wall / args.iters:.1f} ms wall, {1e3 * sfd_cpu / args.iters:.1f} ms CPU")
    print(f"  SFD / SiD: {ratio:.2f}x wall, {sfd_cpu / sid_cpu:.2f}x CPU "
          f"(limit < {ITERATION_LIMIT:.0f}x: {'met' if ratio < ITERATION_LIMIT else 'NOT met'})")


if __name__ == "__main__":
    main()
