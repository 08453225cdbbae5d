"""Training-step cost of SFTMix against plain NTP on the same batch, and the cost of recording training dynamics.

All timings run in one process on the same batches, through the same forward/backward/AdamW step:

* the anchor: one NTP step (`NTPLoss`, one forward, full-vocabulary head, backward, optimizer step);
* one SFTMix step (`SFTMixLoss`: one backbone forward, the head over all positions, one extra head pass over the
  B/2 mixed response states, backward, optimizer step); the goal is at most 1.3x the anchor;
* one NTP step that also stages per-example response NLLs into a `TrainingDynamics` table (the reference run's
  "forward" recording, no second pass);
* one second-pass scoring of the same batch under `torch.no_grad` (what "checkpoint" recording adds per batch and
  per checkpoint).

Each time is the median of `--repeats` steps after `--warmup` steps (a third of them, after one warm-up step, for
the wider model), measured as process CPU time, which is less disturbed than wall time on a shared machine (both
are printed). Models are GPT-2 configurations built from
scratch: the `small` preset's tiny model and a wider one; `--smollm2` adds SmolLM2-135M-Instruct from the installed
GGUF package (slow on CPU).

    python benchmarks/bench_sftmix.py              # about a minute of CPU time on one core
    python benchmarks/bench_sftmix.py --smollm2    # adds the 135M model
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from alignbook.models import tiny_causal_lm
from alignbook.sftmix import NTPLoss, SFTMixLoss, TrainingDynamics, model_inputs, response_nll


def make_batch(vocab: int, batch_size: int, length: int, seed: int = 0) -> dict:
    "Random tokens with prompts of 8 to length/2 tokens and right padding, plus an `index` column."
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    labels = input_ids.clone()
    attention_mask = torch.ones_like(input_ids)
    prompt = torch.randint(8, length // 2, (batch_size,), generator=g)
    end = torch.randint(length * 3 // 4, length + 1, (batch_size,), generator=g)
    for i in range(batch_size):
        labels[i, :prompt[i]] = -100
        labels[i, end[i]:] = -100
        attention_mask[i, end[i]:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "index": torch.arange(batch_size)}


def time_steps(step, warmup: int, repeats: int) -> tuple[float, float]:
    "Median CPU and wall seconds of `step()` over `repeats` calls after `warmup` calls."
    for _ in range(warmup):
        step()
    cpu, wall = [], []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def training_step(model, loss_fn, batch, optimizer):
    def step():
        loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def scoring_pass(model, batch):
    @torch.no_grad()
    def step():
        response_nll(model(**model_inputs(batch)).logits, batch["labels"])
    return step


def bench_model(name: str, model, vocab: int, batch_size: int, length: int, warmup: int, repeats: int) -> dict:
    batch = make_batch(vocab, batch_size, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dynamics = TrainingDynamics(batch_size, 2)
    cases = {
        "NTP step (anchor)": training_step(model, NTPLoss(), batch, optimizer),
        "SFTMix step": training_step(model, SFTMixLoss(seed=0), batch, optimizer),
        "NTP step + forward dynamics": training_step(model, NTPLoss(dynamics), batch, optimizer),
        "second-pass scoring": scoring_pass(model, batch),
    }
    times = {case: time_steps(step, warmup, repeats) for case, step in cases.items()}
    anchor_cpu = times["NTP step (anchor)"][0]
    print(f"\n{name}: vocab {vocab}, batch {batch_size}, length {length}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    print(f"{'case':32s} {'CPU ms':>9s} {'wall ms':>9s} {'CPU / anchor':>13s}")
    for case, (cpu, wall) in times.items():
        print(f"{case:32s} {1e3 * cpu:9.1f} {1e3 * wall:9.1f} {cpu / anchor_cpu:13.2f}")
    ratio = times["SFTMix step"][0] / anchor_cpu
    print(f"SFTMix / NTP step: {ratio:.2f}x (goal <= 1.3x): {'met' if ratio <= 1.3 else 'not met'}")
    return {case: cpu / anchor_cpu for case, (cpu, _) in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before measuring")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps; the median is reported")
    parser.add_argument("--smollm2", action="store_true", help="also time SmolLM2-135M-Instruct (GGUF package)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    bench_model("tiny GPT-2 (small preset)", tiny_causal_lm("gpt2", vocab_size=2048, max_positions=64, **no_dropout),
                2048, 16, 64, args.warmup, args.repeats)
    bench_model("GPT-2, 4 layers x 256, GPT-2 vocabulary",
                tiny_causal_lm("gpt2", vocab_size=50257, hidden_size=256, num_layers=4, num_heads=4,
                               max_positions=128, **no_dropout), 50257, 8, 128, 1, max(3, args.repeats // 3))
    if args.smollm2:
        from alignbook.models import load_causal_lm
        model = load_causal_lm("smollm2")
        bench_model("SmolLM2-135M-Instruct", model, model.config.vocab_size, 8, 128, 1, max(3, args.repeats // 5))


if __name__ == "__main__":
    main()
