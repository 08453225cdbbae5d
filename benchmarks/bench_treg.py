"""Benchmark T-REG against DPO in the same run.

1. Step-time ratio: one DPO-REG optimizer step with precomputed (cached) token rewards divided by one DPO step, on
   the same model and the same batch of real AlpacaEval pairs. Target: at most 1.15.
2. Token-reward precomputation throughput: response tokens scored per second by `compute_token_rewards` (two
   teacher-forced passes per response), reported, not compared with a target.

Usage: `python benchmarks/bench_treg.py [--repeats 10] [--pairs 4] [--smollm2]`. `--smollm2` also measures the
throughput of SmolLM2-135M-Instruct (loading it takes about a minute). Timings are medians of interleaved repeats;
run it on an otherwise idle machine for stable numbers.
"""
import argparse
import copy
import statistics
import time

import torch

from alignbook.core import sequence_logps, token_logps
from alignbook.data import load_alpaca_eval_pairs
from alignbook.models import frozen_copy, load_tokenizer, tiny_causal_lm
from alignbook.preference import dpo_loss, split_pairs
from alignbook.treg import TREGLoss, compute_token_rewards, encode_response, prepare_pair_batches

STEP_RATIO_TARGET = 1.15  # DPO-REG step time over DPO step time
MAX_LENGTH, MAX_PROMPT_LENGTH = 128, 64  # tokens per sequence and per prompt in the step benchmark


def dpo_closure(beta: float):
    """Plain DPO loss closure on a stacked pair batch (the anchor)."""
    def loss_fn(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, mask = token_logps(logits, batch["labels"])
        policy_chosen, policy_rejected = split_pairs(sequence_logps(logps, mask))
        reference_chosen, reference_rejected = split_pairs(batch["reference_logps"])
        return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta), {}
    return loss_fn


def time_step(model, optimizer, loss_fn, batch) -> float:
    start = time.perf_counter()
    loss, _ = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def step_ratio(tokenizer, rows, repeats: int, pairs: int) -> dict:
    model = tiny_causal_lm("gpt2", hidden_size=128, num_layers=4, num_heads=4, seed=0)
    reference = frozen_copy(model)
    batch = prepare_pair_batches(reference, tokenizer, rows[:pairs], batch_size=pairs, max_length=MAX_LENGTH,
                                 max_prompt_length=MAX_PROMPT_LENGTH, progress=False)[0]
    runs = {"dpo": (copy.deepcopy(model), dpo_closure(0.1)), "dpo_reg": (copy.deepcopy(model), TREGLoss(0.1, 0.5))}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, (m, _) in runs.items()}
    times = {name: [] for name in runs}
    for repeat in range(repeats + 2):
        for name, (m, loss_fn) in runs.items():  # interleaved, so load changes hit both equally
            elapsed = time_step(m, optimizers[name], loss_fn, batch)
            if repeat >= 2:  # the first two repeats warm up allocators and kernels
                times[name].append(elapsed)
    dpo, treg = statistics.median(times["dpo"]), statistics.median(times["dpo_reg"])
    return {"dpo_step_ms": 1e3 * dpo, "dpo_reg_step_ms": 1e3 * treg, "ratio": treg / dpo,
            "tokens_per_batch": int(batch["attention_mask"].sum())}


def reward_throughput(model, tokenizer, rows, n: int) -> dict:
    prompts = [r["prompt"] for r in rows[:n]]
    responses = [encode_response(tokenizer, r["chosen"])[:128] for r in rows[:n]]
    start = time.perf_counter()
    compute_token_rewards(model.eval(), tokenizer, prompts, responses, batch_size=8, progress=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(r) for r in responses)
    return {"responses": n, "response_tokens": tokens, "seconds": elapsed, "tokens_per_second": tokens / elapsed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed optimizer steps per method")
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per batch")
    parser.add_argument("--reward-responses", type=int, default=16, help="responses scored for the throughput")
    parser.add_argument("--smollm2", action="store_true", help="also measure SmolLM2-135M-Instruct throughput")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer("gpt2")
    rows = list(load_alpaca_eval_pairs(limit=max(args.pairs, args.reward_responses)))

    result = step_ratio(tokenizer, rows, args.repeats, args.pairs)
    verdict = "meets" if result["ratio"] <= STEP_RATIO_TARGET else "misses"
    print(f"step time, tiny GPT-2 (4 layers, width 128), {args.pairs} pairs, {result['tokens_per_batch']} tokens: "
          f"DPO {result['dpo_step_ms']:.1f} ms, DPO-REG {result['dpo_reg_step_ms']:.1f} ms, "
          f"ratio {result['ratio']:.3f} ({verdict} the target {STEP_RATIO_TARGET})")

    tiny = tiny_causal_lm("gpt2", hidden_size=128, num_layers=4, num_heads=4, seed=0)
    tp = reward_throughput(tiny, tokenizer, rows, args.reward_responses)
    print(f"token-reward precomputation, tiny GPT-2: {tp['response_tokens']} response tokens in {tp['seconds']:.2f} s, "
          f"{tp['tokens_per_second']:.0f} tokens/s (two passes per response)")
    if args.smollm2:
        from alignbook.models import load_causal_lm
        smol_tokenizer = load_tokenizer("smollm2")
        smol = load_causal_lm("smollm2")
        tp = reward_throughput(smol, smol_tokenizer, rows, args.reward_responses)
        print(f"token-reward precomputation, SmolLM2-135M-Instruct: {tp['response_tokens']} response tokens in "
              f"{tp['seconds']:.2f} s, {tp['tokens_per_second']:.0f} tokens/s (two passes per response)")


if __name__ == "__main__":
    main()
