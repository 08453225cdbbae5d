"""Overhead of the ISE patch on a forward pass and on cached greedy generation, against the unpatched model.

Both models are the same randomly initialised Llama (built from a config, no download); the patched copy adds the
segment table and the id checks. The two are timed alternately in the same process on identical inputs, and the
smallest CPU time of several repeats is kept (CPU time, not wall time, because the machine may be shared), so the
printed ratios (patched / unpatched, goal <= 1.02) do not depend on the machine's absolute speed. Timings on a
shared machine are still noisy: rerun with more repeats if a ratio looks off.

Run: python benchmarks/bench_ise.py [--hidden 256] [--layers 4] [--batch 8] [--length 128] [--new-tokens 32]
"""
import argparse
import copy
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from alignbook.ise import add_segment_embedding
from alignbook.models import tiny_causal_lm


def cpu_seconds(fn) -> float:
    "CPU seconds of one call; with one thread this ignores the time spent waiting for a busy CPU."
    start = time.process_time()
    fn()
    return time.process_time() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256, help="model width D")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary size V")
    parser.add_argument("--batch", type=int, default=8, help="sequences per call")
    parser.add_argument("--length", type=int, default=128, help="prompt tokens T")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timings per model; the minimum is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = tiny_causal_lm("llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=4, max_positions=args.length + args.new_tokens).eval()
    patched = add_segment_embedding(copy.deepcopy(base)).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=generator)
    segments = torch.randint(0, 3, (args.batch, args.length), generator=generator)
    segments[:, -1] = 3  # prompts end with an output-tagged header token
    mask = torch.ones_like(ids)
    gen = dict(attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
               do_sample=False, pad_token_id=0)

    with torch.no_grad():
        calls = {
            "forward/base": lambda: base(ids, attention_mask=mask),
            "forward/ise": lambda: patched(ids, attention_mask=mask, token_type_ids=segments),
            "generate/base": lambda: base.generate(ids, **gen),
            "generate/ise": lambda: patched.generate(ids, token_type_ids=segments, **gen),
        }
        for fn in calls.values():  # warm-up
            fn()
        times = {name: [] for name in calls}
        for _ in range(args.repeats):  # alternate the models so load changes hit both
            for name, fn in calls.items():
                times[name].append(cpu_seconds(fn))
    best = {name: min(t) for name, t in times.items()}
    tokens = args.batch * args.new_tokens
    print(f"Llama D={args.hidden}, {args.layers} layers, V={args.vocab}, batch {args.batch}, T={args.length}, "
          f"{args.new_tokens} new tokens, {args.threads} thread(s), best CPU time of {args.repeats}")
    print(f"forward:  base {1000 * best['forward/base']:.1f} ms, ISE {1000 * best['forward/ise']:.1f} ms, "
          f"ratio {best['forward/ise'] / best['forward/base']:.3f} (goal <= 1.02)")
    print(f"generate: base {tokens / best['generate/base']:.1f} tok/s, ISE {tokens / best['generate/ise']:.1f} tok/s, "
          f"time ratio {best['generate/ise'] / best['generate/base']:.3f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
