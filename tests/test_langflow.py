"""Oracles for alignbook.langflow that need a little training: Gaussian rectified flows, reflow, and the synthetic text tier."""
import math

import pytest
import torch

from alignbook.langflow import (
    DiffusionBaseline, LanguageRectifiedFlow, LatentClassifier, LatentStats, TextVAE, TokenEmbedding, VelocityMLP,
    VelocityTransformer, WordTokenizer, config_for, encode_batch, encode_latents, euler_sample,
    latent_classifier_guidance, make_pair_sampler, pad_ids, parse_synthetic, reconstruction_accuracy, reflow_pairs,
    rectified_flow_loss, rk45_sample, round_to_texts, straightness, synthetic_restaurants, train_embedding_flow,
    train_rectified_flow,
)
from alignbook.train import train

torch.set_num_threads(1)

MEAN, STD = torch.tensor([2.0, -1.0]), 0.5  # pi_1 = N(MEAN, STD^2 I), pi_0 = N(0, I)


def v_star(x, t, m=MEAN, s=STD):
    "Exact 1-rectified-flow velocity between N(0, I) and N(m, s^2 I) (the conditional mean of X1 - X0)."
    t = t.reshape(-1, 1)
    return m + (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2) * (x - t * m)


@pytest.fixture(scope="module")
def gaussian_flows():
    torch.manual_seed(0)
    data = MEAN + STD * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1))
    rf1 = VelocityMLP(2, hidden_size=64, num_layers=2)
    train_rectified_flow(rf1, make_pair_sampler(data), steps=1500, lr=3e-3, batch_size=512, seed=0)
    noise = torch.Generator().manual_seed(2)
    z0, z1 = reflow_pairs(rf1.eval(), lambda n: torch.randn(n, 2, generator=noise), 8000, num_steps=100)
    rf2 = VelocityMLP(2, hidden_size=64, num_layers=2)
    train_rectified_flow(rf2, make_pair_sampler(z1, z0, "fixed"), steps=1500, lr=3e-3, batch_size=512, seed=1)
    return rf1.eval(), rf2.eval()


def test_trained_field_matches_conditional_mean(gaussian_flows):
    rf1, _ = gaussian_flows
    g = torch.Generator().manual_seed(3)
    t = 0.05 + 0.9 * torch.rand(4000, generator=g)
    x = t[:, None] * (MEAN + STD * torch.randn(4000, 2, generator=g)) + (1 - t[:, None]) * torch.randn(4000, 2, generator=g)
    with torch.no_grad():
        error = (rf1(x, t) - v_star(x, t)).norm() / v_star(x, t).norm()
    assert error < 0.05, f"relative L2 error {error:.3f}"


def test_exact_field_preserves_marginal():
    z0 = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z1, _ = rk45_sample(lambda z, t: v_star(z, t, MEAN.double(), STD), z0, t0=0.0)
    assert (z1.mean(0) - MEAN.double()).abs().max() < 0.02
    assert ((z1.std(0) - STD).abs() / STD).max() < 0.03


def test_one_step_after_reflow_keeps_moments(gaussian_flows):
    rf1, rf2 = gaussian_flows
    z0 = torch.randn(5000, 2, generator=torch.Generator().manual_seed(5))
    one_step = euler_sample(rf2, z0, 1)
    many_steps = euler_sample(rf1, z0, 100)  # the distribution the reflow pairs were drawn from
    assert ((one_step.mean(0) - many_steps.mean(0)).abs() / many_steps.mean(0).abs()).max() < 0.05
    # With these seeds the one-step std is 5 % below the pairs' std and 7 % below the target's.
    # A 1,500-step regression fit shrinks the spread a little, so the bounds are 8 % and 10 %.
    assert ((one_step.std(0) - many_steps.std(0)).abs() / many_steps.std(0)).max() < 0.08
    assert ((one_step.mean(0) - MEAN).abs() / MEAN.abs()).max() < 0.05
    assert ((one_step.std(0) - STD).abs() / STD).max() < 0.1
    collapsed = euler_sample(rf1, z0, 1)  # 1-RF with one step sends everything near the mean
    assert collapsed.std(0).max() < 0.5 * STD


def test_reflow_straightens_gaussian_flow(gaussian_flows):
    rf1, rf2 = gaussian_flows
    z0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(6))
    assert straightness(rf2, z0) < 0.2 * straightness(rf1, z0)


def test_reflow_straightens_eight_gaussians():
    g = torch.Generator().manual_seed(7)
    angles = 2 * math.pi * torch.randint(0, 8, (8000,), generator=g) / 8
    data = 4 * torch.stack([angles.cos(), angles.sin()], 1) + 0.3 * torch.randn(8000, 2, generator=g)
    torch.manual_seed(1)
    rf1 = VelocityMLP(2, hidden_size=64, num_layers=2)
    train_rectified_flow(rf1, make_pair_sampler(data), steps=500, lr=3e-3, batch_size=512)
    noise = torch.Generator().manual_seed(8)
    z0, z1 = reflow_pairs(rf1.eval(), lambda n: torch.randn(n, 2, generator=noise), 4000, num_steps=50)
    rf2 = VelocityMLP(2, hidden_size=64, num_layers=2)
    train_rectified_flow(rf2, make_pair_sampler(z1, z0, "fixed"), steps=500, lr=3e-3, batch_size=512, seed=1)
    probe = torch.randn(1000, 2, generator=torch.Generator().manual_seed(9))
    assert straightness(rf2.eval(), probe) < straightness(rf1, probe)


@pytest.fixture(scope="module")
def synthetic_vae():
    rows = synthetic_restaurants(3000, seed=0)
    tokenizer = WordTokenizer.from_texts([r["text"] for r in rows])
    ids = encode_batch(tokenizer, [r["text"] for r in rows], max_length=24)
    torch.manual_seed(0)
    vae = TextVAE(len(tokenizer), latent_dim=16, embed_dim=32, hidden_size=64, max_length=24)

    def batch_at(step):
        g = torch.Generator().manual_seed(step)
        return ids[torch.randint(0, len(ids), (64,), generator=g)], g

    def loss_fn(model, batch):
        out = model.elbo_loss(batch[0], beta=0.0, generator=batch[1])
        return out["loss"], {}

    train(vae, loss_fn, batch_at, steps=500, lr=3e-3, progress=False)
    return vae.eval(), tokenizer, ids, rows


def test_synthetic_round_trip_accuracy(synthetic_vae):
    vae, tokenizer, ids, _ = synthetic_vae
    accuracy = reconstruction_accuracy(vae, ids[:500])
    assert accuracy["token"] > 0.9, accuracy
    assert accuracy["exact"] > 0.5, accuracy


def greedy_by_recomputation(vae, z, max_length):
    "Greedy ids from the teacher-forced decoder re-run on the whole prefix at every step (no cache, full batch)."
    ids = torch.empty(z.shape[0], 0, dtype=torch.long)
    for _ in range(max_length):
        placeholder = torch.full((z.shape[0], 1), vae.eos_token_id)  # position k is scored from ids[:, :k] only
        scores = vae.decode_logits(z, torch.cat([ids, placeholder], 1))[:, -1]  # (B, V)
        scores[:, [vae.pad_token_id, vae.bos_token_id]] = torch.finfo(scores.dtype).min
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], 1)
    ended = (ids == vae.eos_token_id).long().cumsum(1) - (ids == vae.eos_token_id).long()  # > 0 after the first eos
    return ids.masked_fill(ended > 0, vae.pad_token_id)


def test_generate_matches_recomputation(synthetic_vae):
    vae, _, ids, _ = synthetic_vae
    with torch.no_grad():
        z = vae.encode(ids[:64])[0]
    generated = vae.generate(z)
    reference = greedy_by_recomputation(vae, z, vae.max_length)[:, : generated.shape[1]]
    lengths = (generated != vae.pad_token_id).sum(1)
    assert lengths.unique().numel() > 3, lengths  # rows leave the batch at different steps
    assert torch.equal(generated, reference)


def test_synthetic_generation_and_guidance(synthetic_vae):
    vae, tokenizer, ids, rows = synthetic_vae
    raw = encode_latents(vae, ids)
    stats = LatentStats.from_latents(raw)
    latents = stats.standardise(raw)
    torch.manual_seed(0)
    velocity = VelocityMLP(16, hidden_size=128, num_layers=2)
    train_rectified_flow(velocity, make_pair_sampler(latents), steps=600, lr=2e-3)
    lf = LanguageRectifiedFlow(vae, tokenizer, velocity, stats)
    texts = lf.sample(200, num_steps=8, generator=torch.Generator().manual_seed(1))
    valid = [parse_synthetic(t) for t in texts]
    assert sum(v is not None for v in valid) / len(valid) > 0.6
    labels = torch.tensor([r["area"] == "riverside" for r in rows]).long()
    classifier = LatentClassifier(16, 2)
    from alignbook.langflow import train_latent_classifier
    train_latent_classifier(classifier, latents, labels, steps=300)
    guided = lf.sample(200, num_steps=8, generator=torch.Generator().manual_seed(1),
                       guidance=latent_classifier_guidance(classifier.eval(), 1, 2.0, velocity))
    rate = lambda ts: sum((p := parse_synthetic(t)) is not None and p["area"] == "riverside" for t in ts) / len(ts)
    assert rate(guided) > rate(texts) + 0.2, (rate(guided), rate(texts))


def test_bad_inputs_raise(synthetic_vae):
    vae, tokenizer, _, _ = synthetic_vae
    lf = LanguageRectifiedFlow(vae, tokenizer, VelocityMLP(16, hidden_size=8, num_layers=1), LatentStats(
        torch.zeros(16), torch.ones(16)))
    with pytest.raises(ValueError, match="num_steps"):
        lf.sample(2, num_steps=0)
    with pytest.raises(ValueError, match="needs a classifier"):
        latent_classifier_guidance(None, 0, 1.0, lf.velocity)
    with pytest.raises(ValueError, match="empty sentence"):
        lf.encode([""])
    with pytest.raises(ValueError, match="max_length"):
        lf.encode(["zizzi " * 30])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        lf.encode(["zizzi serves sushi"])
    with pytest.raises(ValueError, match="needs guidance"):
        lf.edit(["zizzi is a cheap italian restaurant in the riverside . it has great reviews ."])


def test_config_options_are_checked():
    assert config_for("small", {"vae_steps": 5}).vae_steps == 5
    assert config_for("small", {"step_grid": [1, 2]}).step_grid == (1, 2)
    with pytest.raises(ValueError, match="Unknown langflow options"):
        config_for("small", {"vae_step": 5})
    with pytest.raises(ValueError, match="Unknown preset"):
        config_for("huge")


@pytest.mark.parametrize("preset", ["real", "paper"])
def test_presets_build_models(preset):
    config = config_for(preset)
    assert config.backbone == "transformer"
    vae = TextVAE(1000, config.latent_dim, config.backbone, config.embed_dim, config.hidden_size, config.num_layers,
                  config.num_heads, max_length=config.max_words + 1).eval()
    ids = torch.randint(4, 1000, (2, config.max_words + 1))
    with torch.no_grad():
        mu, _ = vae.encode(ids)
        assert vae.decode_logits(mu, ids).shape == (2, config.max_words + 1, 1000)
        assert vae.generate(mu, max_length=3).shape[0] == 2
        velocity = VelocityMLP(config.latent_dim, config.flow_hidden, config.flow_layers)
        assert velocity(mu, torch.zeros(2)).shape == (2, config.latent_dim)


TINY_RUN = dict(vae_steps=3, beta_anneal_steps=2, flow_steps=3, ddpm_steps=3, transfer_steps=3, classifier_steps=3,
                lm_steps=3, num_reflow_pairs=32, num_transfer_pairs=32, reflow_solver_steps=3, num_samples=16,
                num_reference=32, step_grid=(1, 4), ddpm_sample_steps=5, num_edit=8, num_reconstruct=16,
                hidden_size=32, flow_hidden=32, lm_hidden_size=32, vae_batch_size=16, flow_batch_size=32,
                lm_batch_size=16, token_hidden=16, token_ff=32, token_layers=1, token_flow_steps=3,
                token_reflow_steps=3, token_ddpm_steps=3, token_batch_size=8, token_reflow_pairs=16,
                token_reflow_solver_steps=3, token_num_samples=8, token_timing_repeats=1, token_step_grid=(1, 4))


@pytest.mark.parametrize("preset,backbone,training", [("small", "gru", "lexicographic"),
                                                      ("small", "transformer", "two_stage"),
                                                      ("paper", "transformer", "lexicographic")])
def test_run_experiment_end_to_end(preset, backbone, training):
    from alignbook.langflow import run_experiment
    config = config_for(preset, {**TINY_RUN, "backbone": backbone, "training": training,
                                 "joint_steps": 2 if training != "two_stage" else 0, "timing_repeats": 1})
    out = run_experiment(config)
    assert set(out["generation"]["2-RF"]) == {1, 4}
    assert set(out["generation"]["DDPM"]) == {1, 4, 5}
    assert out["editing"]["num_sentences"] > 0
    assert len(out["joint_history"] if training != "two_stage" else out["vae_history"]) in (2, 3)
    for name in ("1-RF", "2-RF", "DDPM"):
        for metrics in out["generation"][name].values():
            assert 0.0 <= metrics["distinct"] <= 1.0
            assert metrics["ppl"] > 1.0
            assert math.isfinite(metrics["w2"])
    for name in ("2-RF", "DDPM"):
        assert 0 < out["speed"][name]["latent_ms"] <= out["speed"][name]["total_ms"]
    embedding = out["embedding_generation"]
    assert set(embedding["2-RF"]) == {1, 4}
    assert set(embedding["DDPM"]) == {4, 5}  # speed_steps and ddpm_sample_steps
    for name in ("1-RF", "2-RF", "DDPM"):
        for metrics in embedding[name].values():
            assert 0.0 <= metrics["distinct"] <= 1.0
            assert metrics["ppl"] > 1.0
    for name in ("2-RF", "DDPM"):
        assert 0 < embedding["speed"][name]["latent_ms"] <= embedding["speed"][name]["total_ms"]


def test_run_experiment_embedding_only():
    from alignbook.langflow import run_experiment
    out = run_experiment(config_for("small", {**TINY_RUN, "representation": "embedding", "max_words": 12}))
    assert "generation" not in out
    assert "speed" not in out
    assert set(out["embedding_generation"]["1-RF"]) == {1, 4}
    assert 0.0 <= out["embedding"]["rounding_accuracy"] <= 1.0
    assert out["embedding"]["rf2"].seq_len == 13


# Embedding representation: (B, n, d) tensors, one vector per token.

def test_rounding_recovers_exact_embeddings():
    embedding = TokenEmbedding(50, 16, seed=3)
    ids = torch.randint(0, 50, (8, 20), generator=torch.Generator().manual_seed(0))
    assert embedding(ids).shape == (8, 20, 16)
    assert torch.equal(embedding.round(embedding(ids)), ids)
    with torch.no_grad():
        embedding.weight[7] *= 20  # a long row would win a plain dot-product argmax
    assert torch.equal(embedding.round(embedding(ids)), ids)


def test_rounding_loss_is_tied_softmax():
    embedding = TokenEmbedding(10, 4)
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    distances = torch.cdist(x.reshape(-1, 4), embedding.table()).pow(2)  # (6, 10)
    expected = torch.nn.functional.cross_entropy(-0.5 * distances, ids.flatten())
    assert torch.allclose(embedding.rounding_loss(x, ids), expected, atol=1e-5)


def test_round_to_texts_cuts_at_eos():
    tokenizer = WordTokenizer.from_texts(["NAME is a pub ."])
    embedding = TokenEmbedding(len(tokenizer), 8)
    a, pub = tokenizer.stoi["a"], tokenizer.stoi["pub"]
    ids = torch.tensor([[tokenizer.bos_token_id, a, 0, pub, tokenizer.eos_token_id, a, a]])
    out_ids, texts = round_to_texts(embedding, tokenizer, embedding(ids))
    assert texts == ["a pub"]
    assert out_ids.tolist() == [[a, pub, tokenizer.eos_token_id]]


def test_exact_velocity_moves_embeddings_in_one_step():
    embedding = TokenEmbedding(30, 16)
    ids = torch.randint(0, 30, (5, 12), generator=torch.Generator().manual_seed(2))
    x1 = embedding(ids).detach()
    x0 = torch.randn(5, 12, 16, generator=torch.Generator().manual_seed(3))
    exact = lambda z, t: x1 - x0
    assert rectified_flow_loss(exact, x0, x1).item() == 0.0
    moved = euler_sample(exact, x0, 1)
    assert torch.allclose(moved, x1, atol=1e-6)
    assert torch.equal(embedding.round(moved), ids)
    assert torch.allclose(euler_sample(exact, x0, 7), x1, atol=1e-5)


def test_straightness_of_sequences_matches_flattened():
    field = lambda z, t: -z * t.reshape(-1, *([1] * (z.dim() - 1)))  # elementwise, so the shape does not matter
    z0 = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(4))
    assert math.isclose(straightness(field, z0, 8), straightness(field, z0.flatten(1), 8), rel_tol=1e-6)


def test_zero_guidance_leaves_sequence_sampler_unchanged():
    torch.manual_seed(0)
    velocity = VelocityTransformer(4, 6, hidden_size=16, num_layers=1, num_heads=2, ff_size=32).eval()
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, 2))
    z0 = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(5))
    unguided = euler_sample(velocity, z0, 4)
    guided = euler_sample(velocity, z0, 4, guidance=latent_classifier_guidance(classifier, 1, 0.0, velocity))
    assert torch.equal(guided, unguided)
    term = latent_classifier_guidance(classifier, 1, 1.0, velocity)(z0, torch.zeros(3))
    assert term.shape == z0.shape
    assert term.abs().sum() > 0


def test_diffusion_baseline_on_sequences():
    denoiser = VelocityTransformer(4, 6, hidden_size=16, num_layers=1, num_heads=2, ff_size=32)
    ddpm = DiffusionBaseline(4, denoiser=denoiser)
    clean = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(6))
    assert ddpm.loss(clean, torch.Generator().manual_seed(0)).dim() == 0
    assert ddpm.sample(torch.randn(3, 6, 4), 3).shape == (3, 6, 4)
    # x0-prediction oracle: one step from the last timestep with the clean sample as output returns it
    T = ddpm.scheduler.config.num_train_timesteps
    noisy = ddpm.scheduler.add_noise(clean, torch.randn(3, 6, 4), torch.full((3,), T - 1))
    ddpm.scheduler.set_timesteps(1)
    assert torch.allclose(ddpm.scheduler.step(clean, ddpm.scheduler.timesteps[0], noisy).prev_sample, clean,
                          atol=1e-6)


def test_embedding_flow_learns_two_sentences():
    "Trained jointly with its embeddings on two sentences, the flow's samples round to one of them."
    ids = torch.tensor([[4, 5, 6, 7, 2, 0], [8, 9, 10, 2, 0, 0]])
    torch.manual_seed(0)
    velocity = VelocityTransformer(8, 6, hidden_size=32, num_layers=2, num_heads=2, ff_size=64)
    embedding = TokenEmbedding(12, 8)
    # 800 steps: with these seeds 98 % of the 16-step samples match, against 80 % after 300 steps
    train_embedding_flow(velocity, embedding, ids.repeat(32, 1), steps=800, lr=2e-3, batch_size=32)
    samples = euler_sample(velocity.eval(), torch.randn(64, 6, 8, generator=torch.Generator().manual_seed(7)), 16)
    rounded = embedding.round(samples)
    matches = ((rounded[:, None] == ids[None]).all(-1)).any(-1)  # (64,) equal to a training sentence
    assert matches.float().mean() > 0.9, rounded[~matches][:4]


def test_embedding_bad_inputs_raise():
    embedding = TokenEmbedding(10, 4)
    velocity = VelocityTransformer(4, 6, hidden_size=16, num_layers=1, num_heads=2, ff_size=32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        embedding(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="long tensor"):
        embedding(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"x must have shape \(B, n, 4\)"):
        embedding.round(torch.zeros(2, 6, 5))
    with pytest.raises(ValueError, match="input_ids has shape"):
        embedding.rounding_loss(torch.zeros(2, 6, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="x has shape"):
        velocity(torch.zeros(2, 7, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="x has shape"):
        velocity(torch.zeros(2, 6), torch.zeros(2))
    with pytest.raises(ValueError, match="t has shape"):
        velocity(torch.zeros(2, 6, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="input_ids has shape"):
        train_embedding_flow(velocity, embedding, torch.zeros(4, 5, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match="length=3"):
        pad_ids(torch.zeros(2, 5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        VelocityTransformer(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="Unknown representation"):
        config_for("small", {"representation": "tokens"})


def test_compare_joint_training_tiny():
    from alignbook.langflow import compare_joint_training
    results = compare_joint_training(config_for("small", TINY_RUN), extra_steps=2)
    assert set(results) == {"two_stage", "lexicographic", "weighted"}
    assert results["two_stage"]["lambda_active"] == 0.0
    assert results["weighted"]["lambda_active"] == 0.0
    assert 0.0 <= results["lexicographic"]["lambda_active"] <= 1.0
    for metrics in results.values():
        assert 0.0 <= metrics["rec_token"] <= 1.0
        assert metrics["latent_rms"] > 0.0
        assert math.isfinite(metrics["flow_loss"])
