"""Step-time ratios of WPO against DPO and against TRL's DPOTrainer, and the peak memory of the WPO weights.

Everything is measured in one run on the same tiny GPT-2 (full 50,257-token vocabulary, so that the output layer and
the weight computation dominate) and the same batch, so the ratios do not depend on the machine's absolute speed:

- our WPO step / our DPO step (goal <= 1.05): the weights add two chunked logsumexps over the logits;
- our DPO step / TRL DPOTrainer step (goal <= 1.0): TRL 1.16 `DPOTrainer.training_step` on the same model and batch;
- extra peak memory of `wpo_weights` over the logits it reads, next to the naive `softmax(z) ** 2` computation,
  measured as the growth of the peak resident set size (Linux VmHWM, reset before the call) in a subprocess.

Run: `python benchmarks/bench_wpo.py` (about a minute on one CPU core; `--repeats N` for more timing samples).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

PAIRS, LENGTH, PROMPT = 4, 64, 16  # batch: 4 pairs of 64 tokens, the first 16 of them prompt


def make_batch(vocab_size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2 * PAIRS, LENGTH), generator=g)
    completion_mask = (torch.arange(LENGTH) >= PROMPT).long().expand(2 * PAIRS, LENGTH).clone()
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
            "completion_mask": completion_mask}


def our_step_fn(model, reference, weighting: bool):
    from alignbook.wpo import WPOLoss
    loss_fn = WPOLoss(beta=0.1, weighting=weighting).closure(reference)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(batch):
        loss, _ = loss_fn(model, {k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return step


def trl_step_fn(model, reference):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from alignbook.models import load_tokenizer
    dataset = Dataset.from_dict({"prompt": ["Hi"] * 2, "chosen": [" yes"] * 2, "rejected": [" no"] * 2})
    args = DPOConfig(output_dir="/tmp/alignbook_bench_trl", report_to=[], use_cpu=True, beta=0.1, learning_rate=1e-6,
                     per_device_train_batch_size=PAIRS)
    trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset,
                         processing_class=load_tokenizer("gpt2"))
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer.train() before the first step
    trainer.model.train()

    def step(batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    return step


def time_steps(steps: dict, batch: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    "Median CPU seconds per step of each function (process time: robust to other jobs on a shared machine)."
    for fn in steps.values():
        for _ in range(warmup):
            fn(batch)
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.process_time()
            fn(batch)
            samples[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


MEMORY_CHILD = r"""
import re, sys, torch
from alignbook.wpo import wpo_weights

def peak_kib():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))

n, t, v, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
logits = torch.randn(n, t, v)
labels = torch.randint(0, v, (n, t)); labels[:, :t // 4] = -100
with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident set size to the current one (Linux >= 4.0)
    f.write("5")
before = peak_kib()
if mode == "wpo":
    wpo_weights(logits, labels)
else:
    (torch.softmax(logits[:, :-1], -1) ** 2).sum(-1)
print((peak_kib() - before) * 1024 / (logits.nelement() * logits.element_size()))
"""


def extra_peak_memory(mode: str, n=8, t=128, v=50257) -> float:
    "Growth of peak RSS while computing the weights, in units of the logits' size (1.0 = one more logits tensor)."
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n), str(t), str(v), mode], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per method")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from alignbook.models import frozen_copy, tiny_causal_lm
    from alignbook.preference import disable_dropout

    base = disable_dropout(tiny_causal_lm("gpt2", hidden_size=64, num_layers=2, num_heads=4, max_positions=LENGTH))
    reference = frozen_copy(base)
    batch = make_batch(base.config.vocab_size)
    steps = {"ours_dpo": our_step_fn(copy.deepcopy(base), reference, weighting=False),
             "ours_wpo": our_step_fn(copy.deepcopy(base), reference, weighting=True),
             "trl_dpo": trl_step_fn(copy.deepcopy(base), copy.deepcopy(reference))}
    seconds = time_steps(steps, batch, args.repeats)
    print(f"setting: GPT-2 (2 layers, width 64, vocab 50257), {PAIRS} pairs x {LENGTH} tokens, "
          f"{args.repeats} timed steps, 1 thread, torch {torch.__version__}")
    for name, value in seconds.items():
        print(f"  {name:9s} {1000 * value:8.1f} CPU ms/step (median)")
    print(f"ratio WPO / DPO (ours):      {seconds['ours_wpo'] / seconds['ours_dpo']:.3f}  (goal <= 1.05)")
    print(f"ratio DPO ours / TRL DPO:    {seconds['ours_dpo'] / seconds['trl_dpo']:.3f}  (goal <= 1.0)")
    wpo_mem, naive_mem = extra_peak_memory("wpo"), extra_peak_memory("naive")
    print(f"extra peak memory of wpo_weights:        {wpo_mem:.3f} x logits (goal < 1: no second (N, T, V) tensor)")
    print(f"extra peak memory of softmax(z)**2 sum:  {naive_mem:.3f} x logits (anchor)")


if __name__ == "__main__":
    main()
