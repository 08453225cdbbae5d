"""Oracles for alignbook.langflow that need a little training: Gaussian rectified flows, reflow, and the synthetic text tier."""
import math

import pytest
import torch

from alignbook.langflow import (
    DiffusionBaseline, EmbeddingRectifiedFlow, LangFlowConfig, LanguageRectifiedFlow, LatentClassifier, LatentStats, TextVAE, TokenEmbedding, VelocityMLP,
    VelocityTransformer, WordTokenizer, config_for, encode_batch, encode_latents, euler_sample,
    latent_classifier_guidance, make_pair_sampler, pad_ids, parse_synthetic, reconstruction_accuracy, reflow_pairs,
    rectified_flow_loss, rk45_sample, round_to_texts, straightness, synthetic_restaurants, train_embedding_flow,
    train_latent_classifier, train_rectified_flow, latent_w2, plot_edit_table,
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
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['vae_step'\] for the langflow chapter"):
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
    config = config_for(preset, {**TINY_RUN, "backbone": backbone, "training": training, "representation": "both",
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

    # the user-level sampler draws the same noise from the same generator, so it returns the same sentences
    tokenizer = WordTokenizer([f"w{i}" for i in range(8)])  # ids 4..11
    flow = EmbeddingRectifiedFlow(embedding, tokenizer, velocity)
    texts = flow.sample(64, 16, generator=torch.Generator().manual_seed(7))
    assert texts == [tokenizer.decode(row) for row in rounded]
    assert sum(text in ("w0 w1 w2 w3", "w4 w5 w6") for text in texts) / len(texts) > 0.9, texts[:4]


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


# Input checks of the public API: each bad value raises a ValueError that names it.


@pytest.fixture(scope="module")
def tiny_flow():
    "An untrained latent route with d = 4: enough to reach every input check."
    torch.manual_seed(0)
    texts = [r["text"] for r in synthetic_restaurants(50, seed=0)]
    tokenizer = WordTokenizer.from_texts(texts)
    vae = TextVAE(len(tokenizer), 4, "gru", 8, 16, max_length=24)
    velocity = VelocityMLP(4, 16, 1)
    return LanguageRectifiedFlow(vae, tokenizer, velocity, LatentStats(torch.zeros(4), torch.ones(4))), texts


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_latent_w2_rejects_non_finite(bad):
    good = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    broken = good.clone()
    broken[2, 1] = bad
    assert latent_w2(good, good) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="X_s contains NaN or infinite"):
        latent_w2(broken, good)
    with pytest.raises(ValueError, match="X_t contains NaN or infinite"):
        latent_w2(good, broken)


@pytest.mark.parametrize("target, scale, n, match", [
    (0, float("nan"), 2, "scale must be a finite number"),
    (0, float("inf"), 2, "scale must be a finite number"),
    (0, -1.0, 2, "scale must be a finite number"),
    (5, 1.0, 2, r"target class ids must be in \[0, 1\]"),
    (-1, 1.0, 2, r"target class ids must be in \[0, 1\]"),
    ("city centre", 1.0, 2, "target must be a class id"),
    (torch.tensor([0.5]), 1.0, 2, "integer class ids"),
    (torch.tensor([0, 1]), 1.0, 3, "target has 2 class ids but the batch has 3"),
])
def test_guidance_rejects_bad_arguments(tiny_flow, target, scale, n, match):
    lf, _ = tiny_flow
    classifier = LatentClassifier(4, 2, 8)
    with pytest.raises(ValueError, match=match):
        lf.sample(n, 2, guidance=latent_classifier_guidance(classifier, target, scale, lf.velocity))


def test_guidance_rejects_other_latent_size_and_sequences(tiny_flow):
    lf, _ = tiny_flow
    wrong_size = latent_classifier_guidance(LatentClassifier(6, 2), 0, 1.0, lf.velocity)
    with pytest.raises(ValueError, match="takes latents of size 6, but the sampler's latents have size 4"):
        lf.sample(2, 2, guidance=wrong_size)
    sequence_velocity = VelocityTransformer(8, 5, 16, 1, 2, 32).eval()
    on_sequences = latent_classifier_guidance(LatentClassifier(8, 2), 0, 1.0, sequence_velocity)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 5, 2\) .* one row of class logits per sample"):
        euler_sample(sequence_velocity, torch.zeros(2, 5, 8), 2, guidance=on_sequences)


def test_guidance_accepts_one_target_per_row(tiny_flow):
    lf, _ = tiny_flow
    guidance = latent_classifier_guidance(LatentClassifier(4, 2, 8), torch.tensor([0, 1, 1]), 1.0, lf.velocity)
    assert guidance(torch.zeros(3, 4), torch.zeros(3)).shape == (3, 4)


def test_flow_rejects_bad_counts_and_latents(tiny_flow):
    lf, _ = tiny_flow
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match="n must be an integer >= 1"):
            lf.sample(n)
    with pytest.raises(ValueError, match="wrap it in a list"):
        lf.encode("the eagle")
    with pytest.raises(ValueError, match="NaN or infinite latents"):
        lf.decode(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError, match=r"z has shape \(2, 5\), expected \(\*, 4\)"):
        lf.decode(torch.zeros(2, 5))


def test_euler_sample_rejects_bad_times():
    velocity = VelocityMLP(4, 16, 1)
    with pytest.raises(ValueError, match="must be finite times"):
        euler_sample(velocity, torch.zeros(2, 4), 4, t0=0.0, t1=float("nan"))
    with pytest.raises(ValueError, match="nothing to integrate"):
        euler_sample(velocity, torch.zeros(2, 4), 4, t0=0.5, t1=0.5)


def test_helpers_reject_bad_shapes_and_labels():
    tokenizer = WordTokenizer.from_texts(["NAME is a pub ."])
    embedding = TokenEmbedding(len(tokenizer), 8)
    with pytest.raises(ValueError, match=r"input_ids has shape \(5,\)"):
        pad_ids(torch.zeros(5, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="empty batch"):
        round_to_texts(embedding, tokenizer, torch.zeros(0, 6, 8))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        train_rectified_flow(VelocityMLP(4, 16, 1), make_pair_sampler(torch.zeros(8, 4)), steps=2, batch_size=0)
    for bad_label in (-1, 2):
        with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 2\)"):
            train_latent_classifier(LatentClassifier(4, 2), torch.zeros(8, 4), torch.full((8,), bad_label), steps=1)


def test_decode_never_emits_unk(tiny_flow):
    lf, _ = tiny_flow
    unk = lf.tokenizer.unk_token_id
    backbone = lf.vae.backbone
    start, step = backbone.start_decoding, backbone.continue_decoding

    def favour_unk(logits):  # make <unk> the argmax at every position
        logits = logits.clone()
        logits[:, unk] = logits.max() + 100.0
        return logits

    backbone.start_decoding = lambda z: (lambda out: (favour_unk(out[0]), out[1]))(start(z))
    backbone.continue_decoding = lambda ids, cache: (lambda out: (favour_unk(out[0]), out[1]))(step(ids, cache))
    try:
        z = torch.zeros(3, 4)
        assert (lf.vae.generate(z) == unk).any()  # without the block the decoder emits <unk>
        texts = lf.decode(z)
    finally:
        del backbone.start_decoding, backbone.continue_decoding
    assert all("<unk>" not in text for text in texts), texts


def test_round_to_texts_drops_unk():
    tokenizer = WordTokenizer.from_texts(["NAME is a pub ."])
    embedding = TokenEmbedding(len(tokenizer), 8)
    a, pub = tokenizer.stoi["a"], tokenizer.stoi["pub"]
    ids = torch.tensor([[a, tokenizer.unk_token_id, pub, tokenizer.eos_token_id]])
    out_ids, texts = round_to_texts(embedding, tokenizer, embedding(ids))
    assert texts == ["a pub"]
    assert out_ids.tolist() == [[a, pub, tokenizer.eos_token_id]]


@pytest.mark.parametrize("field, value, match", [
    ("beta", -1.0, "beta must be a finite number >= 0"),
    ("edit_target", "riverside", "edit_source and edit_target are both 'riverside'"),
    ("beta_anneal_steps", -100, "beta_anneal_steps must be a non-negative int"),
    ("step_grid", (), "step_grid must be a non-empty tuple"),
    ("step_grid", (2.5,), "step_grid must be a non-empty tuple"),
    ("step_grid", 4, "step_grid must be a non-empty tuple"),
    ("latent_dim", 0, "latent_dim must be a positive int"),
    ("ema_decay", 2.0, "ema_decay must be None"),
    ("ema_decay", 1.0, "ema_decay must be None"),
    ("ddpm_sample_steps", 0, "ddpm_sample_steps must be a positive int"),
    ("num_samples", 0, "num_samples must be a positive int"),
    ("guidance_scales", (-1.0,), "guidance_scales must be a non-empty tuple of finite numbers"),
    ("guidance_scales", (float("nan"),), "guidance_scales must be a non-empty tuple of finite numbers"),
    ("guidance_scales", 2.0, "guidance_scales must be a non-empty tuple of finite numbers"),
    ("speed_steps", 0, "speed_steps must be a positive int"),
    ("timing_repeats", 0, "timing_repeats must be a positive int"),
    ("token_heads", 3, "token_heads=3 must divide token_hidden=128"),
    ("max_words", 0, "max_words must be a positive int"),
    ("vae_steps", 0, "vae_steps must be a positive int"),
    ("vae_lr", -1.0, "vae_lr must be a finite number > 0"),
    ("token_noise", -0.1, "token_noise must be a finite number >= 0"),
    ("num_reflow_pairs", 0, "num_reflow_pairs must be a positive int"),
    ("eval_fraction", 1.5, r"eval_fraction must be a number in \(0, 1\)"),
    ("backbone", "lstm", "Unknown backbone 'lstm'"),
    ("seed", "x", "seed must be an int"),
])
def test_config_rejects_bad_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        LangFlowConfig(**{field: value})


def test_config_for_converts_command_line_values():
    assert config_for("small", {"step_grid": 4}).step_grid == (4,)
    assert config_for("small", {"step_grid": "1,2"}).step_grid == (1, 2)
    assert config_for("small", {"guidance_scales": "0,2.5"}).guidance_scales == (0, 2.5)
    assert config_for("small", {"vae_steps": "12"}).vae_steps == 12
    assert config_for("small", {"flow_lr": "0.01"}).flow_lr == 0.01
    assert config_for("small", {"ema_decay": "none"}).ema_decay is None
    with pytest.raises(ValueError, match="Option vae_steps must be an integer, got 'abc'"):
        config_for("small", {"vae_steps": "abc"})
    with pytest.raises(ValueError, match="Option vae_steps must be an integer, got 1.5"):
        config_for("small", {"vae_steps": 1.5})
    with pytest.raises(ValueError, match="Option step_grid must be a list of integers, got '1,x'"):
        config_for("small", {"step_grid": "1,x"})
    with pytest.raises(ValueError, match="vae_steps must be a positive int, got -3"):  # the config's own range check
        config_for("small", {"vae_steps": -3})


def test_edit_table_wraps_long_sentences():
    sentence = " ".join(f"word{i}" for i in range(40))  # about 280 characters
    figure = plot_edit_table([{"source": sentence, "edited": "short"}])
    shown = figure.axes[0].texts[0].get_text()
    assert all(f"word{i}" in shown.split() for i in range(40))
    assert max(len(line) for line in shown.splitlines()) <= 14 + 110


def test_tokenizer_keeps_capital_placeholders():
    "Words are lower-cased unless they are all capitals of two or more characters, as the class docstring states."
    assert WordTokenizer.split("The Eagle NAME near NEAR_BY .") == ["the", "eagle", "NAME", "near", "NEAR_BY", "."]
    assert WordTokenizer.split("THE EAGLE") == ["THE", "EAGLE"]
    assert WordTokenizer.split("I A") == ["i", "a"]  # one capital letter is an ordinary word
    assert "all-capital" in WordTokenizer.__doc__


def test_reproduce_summary_latent_route(tmp_path):
    from alignbook.langflow import reproduce
    from alignbook.reproduce import ReproduceConfig
    # speed_steps=2 is not in step_grid: the timed step counts must still be scored for fluency
    options = {**TINY_RUN, "timing_repeats": 1, "speed_steps": 2, "representation": "both"}
    metrics = reproduce(ReproduceConfig("langflow", out_dir=tmp_path, progress=False, options=options))
    assert "latent route" in metrics["summary"]["metric"]
    assert metrics["summary"]["method"] == metrics["speed_ms_per_sentence"]["2-RF"]["total_ms"]
    assert metrics["speedup"]["ppl"] == {"2-RF": metrics["generation"]["2-RF"][2]["ppl"],
                                         "DDPM": metrics["generation"]["DDPM"][5]["ppl"]}
    assert f"2-RF {metrics['speedup']['ppl']['2-RF']:.3g}" in metrics["summary"]["metric"]
    assert set(metrics["embedding"]["2-RF"]) == {1, 2, 4}
    assert metrics["embedding_speedup"]["ppl"]["2-RF"] == metrics["embedding"]["2-RF"][2]["ppl"]
    for name in ("trajectories", "quality_vs_steps", "edits"):
        assert (tmp_path / "langflow" / f"{name}.png").is_file()


@pytest.mark.parametrize("option", [{"ddpm_sample_steps": 1001}, {"step_grid": (1, 2000)}, {"speed_steps": 1500}])
def test_config_rejects_excess_ddpm_steps(option):
    with pytest.raises(ValueError, match="more than its 1000 training timesteps"):
        config_for("small", option)


def test_reproduce_rejects_bad_options(tmp_path):
    from alignbook.langflow import reproduce
    from alignbook.reproduce import ReproduceConfig
    with pytest.raises(ValueError, match="Set the seed with --seed"):
        reproduce(ReproduceConfig("langflow", out_dir=tmp_path, progress=False, options={**TINY_RUN, "seed": 5}))
    with pytest.raises(ValueError, match=r"num_reference=100000 needs more sentences than the data has"):
        reproduce(ReproduceConfig("langflow", out_dir=tmp_path, progress=False,
                                  options={**TINY_RUN, "num_reference": 100_000}))
