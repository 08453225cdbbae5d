"""Time per generated sentence: 2-rectified flow with 4 Euler steps versus the DDPM baseline with 200 steps.

Both samplers use the small preset's network sizes (latent size 32, MLP 256 x 3) and the same GRU decoder, and
are timed in the same process, so the printed ratios do not depend on the machine's absolute speed. Decoding is
timed twice: with `TextVAE.generate` (cached input gates, finished rows leave the batch) and with a reference
loop that calls `nn.GRU` on [embedding; z] for every word and keeps the whole batch until the last row ends.

Weights are untrained. The cost of a step does not depend on the weights, but the untrained decoder seldom emits
the end-of-sentence id, so its sentences are longer than the 21 to 22 ids that the trained small-preset decoder
emits on average (the script prints the mean length). The decoding times are therefore upper bounds and the
end-to-end ratios lower bounds; the reproduction (`alignbook reproduce langflow`) times trained models.

Run: python benchmarks/bench_langflow.py [--sentences 400] [--repeats 5]
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


@torch.no_grad()
def stepwise_generate(vae: TextVAE, z: torch.Tensor) -> torch.Tensor:
    "Greedy decoding that runs `nn.GRU` on [embedding; z] for every word of every row until the last row ends."
    backbone = vae.backbone
    previous = torch.full((z.shape[0], 1), vae.bos_token_id, dtype=torch.long)  # (B, 1)
    state = torch.tanh(backbone.init_state(z)).unsqueeze(0)  # (1, B, H)
    finished = torch.zeros(z.shape[0], dtype=torch.bool)  # (B,)
    emitted = []
    for _ in range(vae.max_length):
        inputs = torch.cat([backbone.embedding(previous), z.unsqueeze(1)], -1)  # (B, 1, E + d)
        output, state = backbone.decoder(inputs, state)  # (B, 1, H)
        scores = backbone.lm_head(output[:, -1])  # (B, V)
        scores[:, [vae.pad_token_id, vae.bos_token_id]] = torch.finfo(scores.dtype).min
        next_ids = scores.argmax(-1).masked_fill(finished, vae.pad_token_id)  # (B,)
        emitted.append(next_ids)
        finished |= next_ids == vae.eos_token_id
        if finished.all():
            break
        previous = next_ids.unsqueeze(1)
    return torch.stack(emitted, 1)  # (B, L')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=400, help="sentences generated per timing")
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement; the minimum is reported")
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
    ids = vae.generate(noise)  # (B, L')
    if not torch.equal(ids, stepwise_generate(vae, noise)):
        raise RuntimeError("TextVAE.generate and the stepwise reference loop decode different ids.")
    mean_length = (ids != vae.pad_token_id).sum(1).float().mean().item()

    rf_latent = best_of(lambda: euler_sample(velocity, noise, 4), args.repeats)
    ddpm_latent = best_of(lambda: ddpm.sample(noise, config.ddpm_sample_steps), args.repeats)
    decode = best_of(lambda: vae.generate(noise), args.repeats)
    decode_stepwise = best_of(lambda: stepwise_generate(vae, noise), args.repeats)

    ms = lambda seconds: 1000 * seconds / args.sentences
    print(f"{args.sentences} sentences, best of {args.repeats}, one thread, milliseconds per sentence")
    print(f"2-RF, 4 Euler steps:          latent {ms(rf_latent):.4f}")
    print(f"DDPM, {config.ddpm_sample_steps} steps:             latent {ms(ddpm_latent):.4f}")
    print(f"greedy decoding, generate:    {ms(decode):.4f} ({mean_length:.1f} ids per sentence on average)")
    print(f"greedy decoding, stepwise:    {ms(decode_stepwise):.4f}")
    print(f"decoding speed-up of generate over the stepwise loop: {decode_stepwise / decode:.1f}x")
    print(f"latent-only ratio DDPM / 2-RF: {ddpm_latent / rf_latent:.1f}x")
    print(f"end-to-end ratio DDPM / 2-RF, generate: {(ddpm_latent + decode) / (rf_latent + decode):.1f}x")
    print(f"end-to-end ratio DDPM / 2-RF, stepwise: "
          f"{(ddpm_latent + decode_stepwise) / (rf_latent + decode_stepwise):.1f}x")
    # (ddpm + decode) / (rf + decode) >= 20 is true exactly when decode <= (ddpm - 20 rf) / 19
    print(f"an end-to-end ratio of 20x needs decoding under {ms((ddpm_latent - 20 * rf_latent) / 19):.4f}")


if __name__ == "__main__":
    main()
