"""Time per generated sentence: 2-rectified flow with 4 Euler steps versus the DDPM baseline with 200 steps.

Both samplers use the small preset's network sizes (latent size 32, MLP 256 x 3) and the same GRU decoder, and
are timed in the same process, so the printed ratios do not depend on the machine's absolute speed. Weights are
untrained: the cost of a step does not depend on the weights, but an untrained decoder may run to the maximum
length instead of stopping at the end-of-sentence id, so the decoding share is an upper bound.

Run: python benchmarks/bench_langflow.py [--sentences 400] [--repeats 3]
"""
import argparse
import time

import torch

from alignbook.langflow import DiffusionBaseline, LangFlowConfig, TextVAE, VelocityMLP, euler_sample


def best_of(fn, repeats: int) -> float:
    "Smallest wall-clock seconds of `repeats` calls (the least disturbed by other processes)."
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=400, help="sentences generated per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per sampler; the minimum is reported")
    parser.add_argument("--vocab-size", type=int, default=1000, help="decoder vocabulary (E2E small preset: ~1,000)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LangFlowConfig.small()
    velocity = VelocityMLP(config.latent_dim, config.flow_hidden, config.flow_layers).eval()
    ddpm = DiffusionBaseline(config.latent_dim, config.flow_hidden, config.flow_layers).eval()
    vae = TextVAE(args.vocab_size, config.latent_dim, embed_dim=config.embed_dim, hidden_size=config.hidden_size,
                  max_length=config.max_words + 1).eval()
    noise = torch.randn(args.sentences, config.latent_dim)
    rf_latent = best_of(lambda: euler_sample(velocity, noise, 4), args.repeats)
    ddpm_latent = best_of(lambda: ddpm.sample(noise, config.ddpm_sample_steps), args.repeats)
    decode = best_of(lambda: vae.generate(noise), args.repeats)
    per_sentence = lambda seconds: 1000 * seconds / args.sentences
    print(f"{args.sentences} sentences, best of {args.repeats}, one thread")
    print(f"2-RF, 4 Euler steps:      latent {per_sentence(rf_latent):.4f} ms/sentence")
    print(f"DDPM, {config.ddpm_sample_steps} steps:         latent {per_sentence(ddpm_latent):.4f} ms/sentence")
    print(f"GRU greedy decoding:      {per_sentence(decode):.4f} ms/sentence (at most {config.max_words + 1} ids)")
    print(f"latent-only ratio DDPM / 2-RF: {ddpm_latent / rf_latent:.1f}x")
    print(f"with decoding ratio DDPM / 2-RF: {(ddpm_latent + decode) / (rf_latent + decode):.1f}x")


if __name__ == "__main__":
    main()
