"""Time per generated sentence: 2-rectified flow with 4 Euler steps versus the DDPM baseline with 200 steps.

Both representations of the chapter are timed, each against its own DDPM anchor measured in the same process, so
the printed ratios do not depend on the machine's absolute speed.

Latent route: the small preset's network sizes (latent size 32, velocity MLP and DDPM network 1024 x 3) and the
same GRU decoder for both samplers. Decoding is timed twice: with `TextVAE.generate` (cached input gates, finished
rows leave the batch) and with a reference loop that calls `nn.GRU` on [embedding; z] for every word and keeps the
whole batch until the last row ends. The end-to-end ratio is printed for network widths 256 and 1024 as well,
because the decoder's share of the time, and with it the ratio, depends on the cost of one network call.

Embedding route: (n, 16) token embeddings with n = 33 positions, `VelocityTransformer` networks of the small
preset's size (2 layers, width 128, 4 heads) for the flow and for the DDPM, and decoding by tied-softmax rounding
followed by detokenising (`round_to_texts`).

Weights are untrained. The cost of a network call does not depend on the weights. The untrained GRU decoder,
however, seldom emits the end-of-sentence id, so its sentences are longer than the 21 to 22 ids that the trained
small-preset decoder emits on average (the script prints the mean length). The latent decoding times are therefore
upper bounds and the latent end-to-end ratios lower bounds. Rounding is one (n d) x V product per sentence for
any weights, and only the detokenising depends on where the end-of-sentence id falls. The reproduction
(`alignbook reproduce langflow`) times trained models.

Run: python benchmarks/bench_langflow.py [--sentences 400] [--embedding-sentences 64] [--repeats 5]
                                          [--widths 256 1024]
"""
import argparse
import time

import torch

from alignbook.langflow import (
    DiffusionBaseline, LangFlowConfig, TextVAE, TokenEmbedding, VelocityMLP, VelocityTransformer, WordTokenizer,
    euler_sample, round_to_texts,
)


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
    parser.add_argument("--embedding-sentences", type=int, default=64,
                        help="sentences generated per timing of the embedding route (its DDPM is slower per call)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per measurement; the minimum is reported")
    parser.add_argument("--vocab-size", type=int, default=1000, help="decoder vocabulary (E2E small preset: ~1,000)")
    parser.add_argument("--widths", type=int, nargs="*", default=[256, 1024],
                        help="velocity/DDPM network widths whose end-to-end ratio is printed")
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
    for width in args.widths:
        rf_width, ddpm_width = time_latent_samplers(config, width, noise, args.repeats)
        print(f"width {width}: 2-RF latent {ms(rf_width):.4f}, DDPM latent {ms(ddpm_width):.4f}, end-to-end ratio "
              f"DDPM / 2-RF {(ddpm_width + decode) / (rf_width + decode):.1f}x")
    embedding_ratio = time_embedding_route(config, args)
    print(f"end-to-end ratio DDPM / 2-RF, latent route (generate): {(ddpm_latent + decode) / (rf_latent + decode):.1f}x; "
          f"embedding route: {embedding_ratio:.1f}x")


@torch.no_grad()
def time_latent_samplers(config: LangFlowConfig, width: int, noise: torch.Tensor, repeats: int) -> tuple[float, float]:
    "Seconds for 4 Euler steps of a velocity MLP and for the DDPM's steps, both `width` wide."
    velocity = VelocityMLP(config.latent_dim, width, config.flow_layers).eval()
    ddpm = DiffusionBaseline(config.latent_dim, width, config.flow_layers).eval()
    return (best_of(lambda: euler_sample(velocity, noise, config.speed_steps), repeats),
            best_of(lambda: ddpm.sample(noise, config.ddpm_sample_steps), repeats))


@torch.no_grad()
def time_embedding_route(config: LangFlowConfig, args) -> float:
    "Print the embedding route's timings and return its end-to-end ratio DDPM / 2-RF."
    seq_len = config.max_words + 1
    make_network = lambda: VelocityTransformer(config.token_dim, seq_len, config.token_hidden, config.token_layers,
                                               config.token_heads, config.token_ff).eval()
    velocity = make_network()
    ddpm = DiffusionBaseline(config.token_dim, denoiser=make_network()).eval()
    tokenizer = WordTokenizer([f"w{i}" for i in range(args.vocab_size - 4)])  # 4 special tokens come first
    embedding = TokenEmbedding(len(tokenizer), config.token_dim)
    noise = torch.randn(args.embedding_sentences, seq_len, config.token_dim)
    repeats = min(args.repeats, 3)  # one DDPM run of 64 sentences takes seconds
    rf = best_of(lambda: euler_sample(velocity, noise, 4), repeats)
    diffusion = best_of(lambda: ddpm.sample(noise, config.ddpm_sample_steps), repeats)
    samples = euler_sample(velocity, noise, 4)
    rounding = best_of(lambda: round_to_texts(embedding, tokenizer, samples), repeats)

    ms = lambda seconds: 1000 * seconds / args.embedding_sentences
    print(f"embedding route, {args.embedding_sentences} sentences of {seq_len} positions, best of {repeats}")
    print(f"2-RF, 4 Euler steps:          sampling {ms(rf):.4f}")
    print(f"DDPM, {config.ddpm_sample_steps} steps:             sampling {ms(diffusion):.4f}")
    print(f"rounding and detokenising:    {ms(rounding):.4f}")
    print(f"sampling-only ratio DDPM / 2-RF: {diffusion / rf:.1f}x")
    ratio = (diffusion + rounding) / (rf + rounding)
    print(f"end-to-end ratio DDPM / 2-RF, embedding route: {ratio:.1f}x")
    return ratio


if __name__ == "__main__":
    main()
