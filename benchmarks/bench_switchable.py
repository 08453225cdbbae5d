"""Wall-clock speed-up of the switchable skip path against the full model on the same inputs.

The anchor is the full model run through the same skip path with every gate on, measured in the same run. The
script prints, per configuration, the measured time ratio (skip / full) next to the analytic FLOPs ratio; the
goal is a speed-up close to the FLOPs saving. Rows cover sub-layer skipping and token skipping on a BERT encoder,
and sub-layer plus token skipping on a BART encoder-decoder (teacher-forced logits). The "budget" rows give every
instance its own random decision vector with mean FLOPs near `--budget`, as a trained policy does, so the skip
path pays for grouping instances by decision vector.

Usage: python benchmarks/bench_switchable.py [--repeats 30] [--width 256] [--layers 6] [--length 128] [--budget 0.5]
"""
import argparse
import platform
import time

import torch

from alignbook.switchable import e2e_model, flops_fraction, skip_forward, toy_model


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _row(label: str, flops: float, skip_time: float, full_time: float) -> str:
    ratio = skip_time / full_time
    return f"| {label} | {flops:.3f} | {ratio:.3f} | {ratio / flops:.2f} |"


def _keep_tokens(batch_size: int, length: int, fraction: float) -> torch.Tensor:
    keep = torch.zeros(batch_size, length)
    keep[:, : max(1, int(length * fraction))] = 1.0                                     # position 0 always kept
    return keep


def bench_encoder(args, generator) -> None:
    model = toy_model(layers=args.layers, width=args.width, max_positions=args.length).eval()
    J = model.num_decisions
    print(f"\nBERT encoder {args.layers}x{args.width}, {args.length} tokens")
    print("| batch, kept sub-layers, kept tokens | FLOPs ratio | time ratio skip/full | time ratio / FLOPs ratio |")
    print("|---|---|---|---|")
    for batch_size in (1, 32):
        ids = torch.randint(1, 12, (batch_size, args.length), generator=generator)
        mask = torch.ones_like(ids)
        full = torch.ones(batch_size, J)
        full_time = _time(lambda: skip_forward(model, ids, mask, full), args.repeats)
        for kept, token_fraction in ((J // 2, 1.0), (J // 4, 1.0), (0, 1.0), (J, 0.5), (J // 2, 0.5)):
            decisions = torch.zeros(batch_size, J)
            decisions[:, :kept] = 1.0
            keep = None if token_fraction == 1.0 else _keep_tokens(batch_size, args.length, token_fraction)
            skip_time = _time(lambda: skip_forward(model, ids, mask, decisions, keep), args.repeats)
            kept_lengths = None if keep is None else keep.sum(-1)
            flops = float(flops_fraction(model, mask.sum(-1), decisions, kept_lengths).mean())
            print(_row(f"{batch_size}, {kept}/{J}, {token_fraction:.0%}", flops, skip_time, full_time))
        decisions = _budget_decisions(model, mask, args.budget, generator)
        skip_time = _time(lambda: skip_forward(model, ids, mask, decisions), args.repeats)
        flops = float(flops_fraction(model, mask.sum(-1), decisions).mean())
        groups = len(torch.unique(decisions, dim=0))
        print(_row(f"{batch_size}, budget {args.budget} ({groups} distinct vectors), 100%", flops, skip_time, full_time))


def _budget_decisions(model, mask, budget: float, generator) -> torch.Tensor:
    "Random per-instance decisions whose keep probability is bisected so the mean FLOPs fraction is near `budget`."
    low, high = 0.0, 1.0
    uniform = torch.rand(mask.shape[0], model.num_decisions, generator=generator)
    for _ in range(30):
        keep_probability = (low + high) / 2
        decisions = (uniform < keep_probability).float()
        if float(flops_fraction(model, mask.sum(-1), decisions).mean()) > budget:
            high = keep_probability
        else:
            low = keep_probability
    return (uniform < low).float()


def bench_seq2seq(args, generator) -> None:
    model = e2e_model(vocab_size=1000, d_model=args.width, layers=3, ffn_dim=4 * args.width, heads=4,
                      max_positions=max(args.length, 64)).eval()
    J = model.num_decisions
    n, m = args.length, args.length // 2
    print(f"\nBART encoder-decoder 3+3 x {args.width}, {n} source and {m} target tokens, teacher-forced logits")
    print("| batch, kept sub-layers, kept tokens | FLOPs ratio | time ratio skip/full | time ratio / FLOPs ratio |")
    print("|---|---|---|---|")
    for batch_size in (1, 16):
        src = torch.randint(4, 1000, (batch_size, n), generator=generator)
        tgt = torch.randint(4, 1000, (batch_size, m), generator=generator)
        mask = torch.ones_like(src)
        full = torch.ones(batch_size, J)
        full_time = _time(lambda: model.skip_logits(src, mask, tgt, full), args.repeats)
        for kept, token_fraction in ((J // 2, 1.0), (J, 0.5), (J // 2, 0.5)):
            decisions = torch.zeros(batch_size, J)
            decisions[:, :kept] = 1.0
            keep = None if token_fraction == 1.0 else _keep_tokens(batch_size, n, token_fraction)
            skip_time = _time(lambda: model.skip_logits(src, mask, tgt, decisions, keep), args.repeats)
            lengths, targets = torch.full((batch_size,), n), torch.full((batch_size,), m)
            kept_lengths = None if keep is None else keep.sum(-1)
            flops = float((model.flops(lengths, targets, decisions, kept_lengths) / model.flops(lengths, targets)).mean())
            print(_row(f"{batch_size}, {kept}/{J}, {token_fraction:.0%}", flops, skip_time, full_time))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement")
    parser.add_argument("--width", type=int, default=256, help="hidden size D (FFN is 4D)")
    parser.add_argument("--layers", type=int, default=6, help="encoder layers of the BERT model")
    parser.add_argument("--length", type=int, default=128, help="source tokens per instance")
    parser.add_argument("--budget", type=float, default=0.5, help="mean FLOPs fraction of the per-instance rows")
    args = parser.parse_args()
    if not 0 < args.budget <= 1:
        parser.error(f"--budget must lie in (0, 1], got {args.budget}.")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with torch.no_grad():
        bench_encoder(args, generator)
        bench_seq2seq(args, generator)


if __name__ == "__main__":
    main()
