"""Wall-clock speed-up of the switchable skip path against the full model on the same inputs.

The anchor is the full model run through the same skip path with every gate on, measured in the same run. The
script prints, per keep fraction, the measured time ratio (skip / full) next to the analytic FLOPs ratio; the
goal is a speed-up close to the FLOPs saving.

Usage: python benchmarks/bench_switchable.py [--repeats 30] [--width 256] [--layers 6]
"""
import argparse
import platform
import time

import torch

from alignbook.switchable import flops_fraction, skip_forward, toy_model


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement")
    parser.add_argument("--width", type=int, default=256, help="hidden size D (FFN is 4D)")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers")
    parser.add_argument("--length", type=int, default=128, help="tokens per instance")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = toy_model(layers=args.layers, width=args.width, max_positions=args.length).eval()
    generator = torch.Generator().manual_seed(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; BERT {args.layers}x{args.width}, {args.length} tokens")
    print("| batch | kept sub-layers | FLOPs ratio | time ratio skip/full | time ratio / FLOPs ratio |")
    print("|---|---|---|---|---|")
    for batch_size in (1, 32):
        ids = torch.randint(1, 12, (batch_size, args.length), generator=generator)
        mask = torch.ones_like(ids)
        full = torch.ones(batch_size, model.num_decisions)
        full_time = _time(lambda: skip_forward(model, ids, mask, full), args.repeats)
        for kept in (model.num_decisions // 2, model.num_decisions // 4, 0):
            decisions = torch.zeros(batch_size, model.num_decisions)
            decisions[:, :kept] = 1.0
            skip_time = _time(lambda: skip_forward(model, ids, mask, decisions), args.repeats)
            flops = float(flops_fraction(model, mask.sum(-1), decisions).mean())
            ratio = skip_time / full_time
            print(f"| {batch_size} | {kept}/{model.num_decisions} | {flops:.3f} | {ratio:.3f} | {ratio / flops:.2f} |")


if __name__ == "__main__":
    main()
