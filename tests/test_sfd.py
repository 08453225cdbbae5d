"""Tests for `alignbook.sfd`: the SiD loss identity, the trainer's isolation and SiD limit, a 2-D forgetting run,
and the text-to-image path on a tiny `UNet2DConditionModel`."""

import copy
import re

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from alignbook.sfd import (
    ExperimentConfig, GuidedScore, LabelledEpsMLP, OneStepGenerator, SFDConfig, SFDTrainer, VPSchedule,
    build_teacher_unet, class_conditional_unet, concept_forgetting_config, ddim_sample, decode_latents,
    experiment_config, fake_score_loss, forgetting_metrics, frechet_distance, gaussian_mixture, mixture_means,
    plot_sample_grids, predict_eps, random_batches, results_table, sample_override_labels, sid_generator_loss,
    sid_loss_from_denoised, teacher_loss_fn,
)
from alignbook.train import train as shared_train

torch.set_num_threads(1)
SCHEDULE = VPSchedule()


@pytest.fixture(scope="module")
def teacher():
    return class_conditional_unet(block_out_channels=(16, 32), seed=0).eval()


def _max_grad(module):
    return max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None)


def test_sigma_at_t_init():
    assert SCHEDULE.sigma(torch.tensor([440])).item() == pytest.approx(2.502, abs=1e-3)
    assert SCHEDULE.t_for_sigma(2.5) == 440


def test_ve_form_of_noisy_sample():
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([10, 440, 900])
    x_t = SCHEDULE.add_noise(x0, noise, t)
    ve = x0 + SCHEDULE.sigma(t).view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(x_t / SCHEDULE.a(t).view(-1, 1, 1, 1), ve, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
def test_sid_identity_float64(alpha):
    g = torch.Generator().manual_seed(0)
    f_phi, f_psi, x_g = (torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    loss = sid_loss_from_denoised(f_phi, f_psi, x_g, alpha=alpha, use_omega=False, reduction="none")
    diff = (f_phi - f_psi).flatten(1)
    expanded = (1 - alpha) * diff.square().sum(1) + (diff * (f_psi - x_g).flatten(1)).sum(1)
    torch.testing.assert_close(loss, expanded, rtol=0, atol=1e-10)


def test_sid_loss_shapes_and_reductions():
    f_phi, f_psi, x_g = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    per_sample = sid_loss_from_denoised(f_phi, f_psi, x_g, reduction="none")
    assert per_sample.shape == (5,)
    torch.testing.assert_close(sid_loss_from_denoised(f_phi, f_psi, x_g), per_sample.mean())
    torch.testing.assert_close(sid_loss_from_denoised(f_phi, f_psi, x_g, reduction="sum"), per_sample.sum())
    with pytest.raises(ValueError, match="reduction must be"):
        sid_loss_from_denoised(f_phi, f_psi, x_g, reduction="avg")


def test_omega_is_stop_gradient():
    g = torch.Generator().manual_seed(1)
    f_phi = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    f_psi, x_g = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    grad, = torch.autograd.grad(sid_loss_from_denoised(f_phi, f_psi, x_g, alpha=1.2), f_phi)
    omega = (f_phi.detach() - x_g).abs().mean(dim=(1, 2, 3), keepdim=True)
    diff = f_phi - f_psi
    reference = ((diff * ((f_phi - x_g) - 1.2 * diff)) / omega).flatten(1).sum(1).mean()
    grad_ref, = torch.autograd.grad(reference, f_phi)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10)


def test_generator_init_is_teacher_one_step(teacher):
    generator = OneStepGenerator(copy.deepcopy(teacher), SCHEDULE, t_init=440)
    z, c = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    t = torch.full((3,), 440)
    a, b = SCHEDULE.a(t).view(-1, 1, 1, 1), SCHEDULE.b(t).view(-1, 1, 1, 1)
    with torch.no_grad():
        expected = (b * z - b * predict_eps(teacher, b * z, t, c)) / a
        torch.testing.assert_close(generator(z, c), expected)
    assert generator(z, c).shape == z.shape


def test_fake_loss_zero_for_true_noise():
    x0 = torch.randn(4, 1, 4, 4)

    class TrueNoise(nn.Module):
        def forward(self, x_t, t, cond):
            return (x_t - SCHEDULE.a(t).view(-1, 1, 1, 1) * x0) / SCHEDULE.b(t).view(-1, 1, 1, 1)

    loss = fake_score_loss(TrueNoise(), x0, None, SCHEDULE, reduction="none", generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4,)
    assert loss.abs().max().item() < 1e-8


def test_fake_loss_minimised_by_generator_score():
    m, s = 0.3, 0.5
    x_gen = m + s * torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(0))

    class GaussianScore(nn.Module):
        def __init__(self, mean, std):
            super().__init__()
            self.mean, self.std = mean, std

        def forward(self, x_t, t, cond):
            a, b = SCHEDULE.a(t).view(-1, 1, 1, 1), SCHEDULE.b(t).view(-1, 1, 1, 1)
            return b * (x_t - a * self.mean) / (a ** 2 * self.std ** 2 + b ** 2)

    def loss(mean, std):
        return fake_score_loss(GaussianScore(mean, std), x_gen, None, SCHEDULE,
                               generator=torch.Generator().manual_seed(1)).item()

    a2 = SCHEDULE.a(torch.arange(38, 712)) ** 2
    closed_form = (4 * a2 * s ** 2 / (a2 * s ** 2 + 1 - a2)).mean().item()
    assert loss(m, s) == pytest.approx(closed_form, abs=0.03)
    for mean, std in [(0.0, 0.5), (0.3, 0.3), (0.3, 0.8)]:
        assert loss(mean, std) > loss(m, s) + 0.01


def test_keep_term_zero_at_init(teacher):
    labels = torch.arange(1, 9)
    keep = SFDTrainer(teacher, SFDConfig.small(batch_size=8, lambda_forget_gen=0.0))
    loss, _ = keep.generator_loss(labels)
    assert loss.item() == 0.0
    loss.backward()
    assert _max_grad(keep.generator) < 1e-6


def test_forget_term_gradient_nonzero(teacher):
    labels = torch.arange(1, 9)
    forget = SFDTrainer(teacher, SFDConfig.small(batch_size=8, lambda_remain_gen=0.0))
    loss, _ = forget.generator_loss(labels)
    loss.backward()
    assert _max_grad(forget.generator) > 1e-3


def test_parameter_isolation(teacher):
    trainer = SFDTrainer(teacher, SFDConfig.small(batch_size=4))
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    labels = torch.tensor([1, 2, 3, 4])
    trainer.generator_step(labels)
    assert all(p.grad is None for p in trainer.teacher.parameters())
    assert all(p.grad is None for p in trainer.fake.parameters())
    generator_grads = [p.grad.clone() for p in trainer.generator.parameters()]
    trainer.fake_step(labels)
    for grad, p in zip(generator_grads, trainer.generator.parameters()):
        assert torch.equal(grad, p.grad)
    for _ in range(2):
        trainer.step(labels)
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_zero_forget_weight_is_sid(teacher):
    config = SFDConfig.small(batch_size=4, lambda_forget_fake=0.0, lambda_forget_gen=0.0)
    labels = torch.tensor([1, 2, 3, 4])
    trainer = SFDTrainer(teacher, config)
    trainer_losses = [tuple(trainer.step(labels).values()) for _ in range(2)]

    rng = torch.Generator().manual_seed(config.seed)
    generator = OneStepGenerator(copy.deepcopy(teacher).requires_grad_(True), SCHEDULE, config.t_init)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    opt_fake = torch.optim.Adam(fake.parameters(), lr=config.lr_fake, betas=config.betas)
    opt_gen = torch.optim.Adam(generator.parameters(), lr=config.lr_gen, betas=config.betas)
    reference_losses = []
    for _ in range(2):
        opt_fake.zero_grad()
        with torch.no_grad():
            x_g = generator(torch.randn((4, 1, 8, 8), generator=rng), labels)
        loss_fake = fake_score_loss(fake, x_g, labels, SCHEDULE, generator=rng)
        loss_fake.backward()
        torch.nn.utils.clip_grad_value_(fake.parameters(), 1.0)
        opt_fake.step()
        opt_gen.zero_grad()
        fake.requires_grad_(False)
        x_g = generator(torch.randn((4, 1, 8, 8), generator=rng), labels)
        loss_gen = sid_generator_loss(teacher, fake, x_g, labels, labels, SCHEDULE, generator=rng)
        loss_gen.backward()
        torch.nn.utils.clip_grad_value_(generator.parameters(), 1.0)
        opt_gen.step()
        fake.requires_grad_(True)
        reference_losses.append((loss_fake.item(), loss_gen.item()))
    torch.testing.assert_close(torch.tensor(trainer_losses), torch.tensor(reference_losses), rtol=1e-5, atol=1e-5)
    for p, q in zip(trainer.generator.parameters(), generator.parameters()):
        torch.testing.assert_close(p, q)


def test_shared_loop_matches_steps_and_resumes(teacher, tmp_path):
    config = SFDConfig.small(batch_size=4)
    labels = torch.tensor([1, 2, 3, 4])
    manual = SFDTrainer(teacher, config)
    for _ in range(3):
        manual.step(labels)
    first = SFDTrainer(teacher, config)
    first.train(2, lambda n, generator: labels, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    resumed = SFDTrainer(teacher, config)
    history = resumed.train(3, lambda n, generator: labels, checkpoint_dir=tmp_path, checkpoint_every=2,
                            resume=True, progress=False)
    assert [h["step"] for h in history] == [1, 2, 3]
    for p, q in zip(manual.modules.parameters(), resumed.modules.parameters()):
        torch.testing.assert_close(p, q)


def test_save_and_load_generator(teacher, tmp_path):
    trainer = SFDTrainer(teacher, SFDConfig.small(batch_size=4))
    trainer.step(torch.tensor([1, 2, 3, 4]))
    trainer.save_pretrained(tmp_path)
    assert (tmp_path / "generator" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = OneStepGenerator.from_pretrained(tmp_path, "generator")
    z, c = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, c), trainer.generator(z, c))
    with pytest.raises(ValueError, match="subfolder must be 'generator_ema' or 'generator', got 'fake'"):
        OneStepGenerator.from_pretrained(tmp_path, "fake")


def test_data_free_contract_rejects_images(teacher):
    trainer = SFDTrainer(teacher, SFDConfig.small(batch_size=4))
    with pytest.raises(ValueError, match="takes labels, not images"):
        trainer.step(torch.randn(4, 1, 8, 8))
    with pytest.raises(ValueError, match="contain the forget label"):
        trainer.step(torch.tensor([0, 1, 2, 3]))


def test_bad_inputs(teacher):
    with pytest.raises(ValueError, match="override_label equals forget_label"):
        SFDConfig(forget_label=3, override_label=3)
    with pytest.raises(ValueError, match="forget_label must be"):
        SFDConfig(forget_label=10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        SFDTrainer(teacher, SFDConfig.small(batch_size=4)).step(torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="t_init must be"):
        SFDTrainer(teacher, SFDConfig.small(t_init=1000))
    from diffusers import UNet2DModel
    plain = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    with pytest.raises(ValueError, match="no class embedding"):
        SFDTrainer(plain, SFDConfig.small())


def test_override_sampling_uniform():
    draws = sample_override_labels(100_000, 4, 10, None, mode="rand", generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=10).double()
    assert counts[4].item() == 0
    expected = 100_000 / 9
    chi2 = ((counts[counts > 0] - expected) ** 2 / expected).sum().item()
    assert chi2 < 26.1  # 0.999 quantile, 8 degrees of freedom
    assert torch.equal(sample_override_labels(3, 0, 10, 1), torch.ones(3, dtype=torch.long))


def test_forget_accuracy_normalised_by_forget_requests():
    requested = torch.tensor([0] * 10 + [2] * 90)
    predicted = torch.tensor([0] * 3 + [1] * 7 + [2] * 90)

    class Fixed(nn.Module):
        def forward(self, images):
            return torch.nn.functional.one_hot(predicted, 10).float() * 10

    metrics = forgetting_metrics(Fixed(), torch.zeros(100, 1, 8, 8), requested, 0, 1)
    assert metrics["forget_acc"] == pytest.approx(0.3)
    assert metrics["override_rate"] == pytest.approx(0.7)
    assert metrics["remain_acc"] == pytest.approx(1.0)


def test_frechet_distance_oracles():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 3, generator=g)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    std_s, std_t = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0])
    x_s = torch.randn(200_000, 2, generator=g) * std_s
    x_t = torch.randn(200_000, 2, generator=g) * std_t + torch.tensor([1.0, -1.0])
    assert frechet_distance(x_s, x_t) == pytest.approx(2.0 + ((std_s - std_t) ** 2).sum().item(), abs=0.05)


def test_experiment_options():
    config = experiment_config("small", {"steps": "30", "lambda_forget": "0.1", "override_label": "7"})
    assert config.sfd.n_iters == 30
    assert config.sfd.lambda_forget_gen == config.sfd.lambda_forget_fake == 0.1
    assert config.sfd.override_label == 7
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['stepz'\] for the sfd chapter"):
        experiment_config("small", {"stepz": 3})


def test_mixture_forget_component_moves_to_override():
    g = torch.Generator().manual_seed(0)
    points, labels = gaussian_mixture(20_000, generator=g)
    torch.manual_seed(0)
    teacher = LabelledEpsMLP()
    shared_train(teacher, teacher_loss_fn(SCHEDULE, null_label=4, generator=g), random_batches(points, labels, 256, g),
                 3000, lr=1e-3, progress=False)
    teacher.eval()
    requested = torch.arange(4).repeat_interleave(300)
    ddim = ddim_sample(teacher, requested, (2,), SCHEDULE, generator=torch.Generator().manual_seed(1))
    means = mixture_means()
    for k in range(4):
        assert (ddim[requested == k].mean(0) - means[k]).norm() < 0.1

    def generated_means(lambda_forget):
        config = SFDConfig(num_classes=4, forget_label=0, override_label=1, lr_fake=1e-4, lr_gen=1e-4,
                           batch_size=128, n_iters=600, lambda_forget_fake=lambda_forget,
                           lambda_forget_gen=lambda_forget, ema_decay=0.0)
        trainer = SFDTrainer(teacher, config, schedule=SCHEDULE, sample_shape=(2,))
        trainer.train(progress=False)
        with torch.no_grad():
            x = trainer.generator(torch.randn(1200, 2, generator=torch.Generator().manual_seed(2)), requested)
        return torch.stack([x[requested == k].mean(0) for k in range(4)])

    sfd_means, sid_means = generated_means(1.0), generated_means(0.0)
    assert (sfd_means[0] - means[1]).norm() < 0.3
    assert (sid_means[0] - means[0]).norm() < 0.3
    # Kept components stay far closer to their own mean than to any other (2.8 apart). SFD moves them more than
    # SiD does: component 3 ends 0.43 from its mean here (SiD 0.14), so the bound is 0.5.
    for k in (1, 2, 3):
        assert (sfd_means[k] - means[k]).norm() < 0.5


def _tiny_text_unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8)


def test_text_unet_sfd_step_and_save(tmp_path):
    torch.manual_seed(0)
    unet = _tiny_text_unet().eval()
    empty = torch.randn(1, 5, 16)
    retain, forget, override = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    teacher = GuidedScore(unet, empty, guidance_scale=4.5)
    fake = GuidedScore(copy.deepcopy(unet), empty, guidance_scale=4.5)
    config = concept_forgetting_config(batch_size=2)
    trainer = SFDTrainer(teacher, config, fake=fake,
                         generator=OneStepGenerator(copy.deepcopy(unet), SCHEDULE, config.t_init))
    assert trainer.sample_shape == (4, 8, 8)
    teacher_before = {k: v.clone() for k, v in unet.state_dict().items()}
    generator_before = [p.detach().clone() for p in trainer.generator.parameters()]
    fake_before = [p.detach().clone() for p in trainer.fake.parameters()]

    metrics = trainer.step(retain, forget_cond=forget, override_cond=override)

    assert set(metrics) == {"fake/remain", "fake/forget", "gen/remain", "gen/forget"}
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    for key, value in unet.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert any(not torch.equal(p, q) for p, q in zip(trainer.generator.parameters(), generator_before))
    assert any(not torch.equal(p, q) for p, q in zip(trainer.fake.parameters(), fake_before))

    trainer.save_pretrained(tmp_path)
    loaded = OneStepGenerator.from_pretrained(tmp_path, "generator")
    assert isinstance(loaded.unet, UNet2DConditionModel)
    assert loaded.t_init == 625
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, retain), trainer.generator(z, retain))
    assert (tmp_path / "fake" / "diffusion_pytorch_model.safetensors").is_file()


def test_guided_score_scale_one_is_plain_network():
    torch.manual_seed(0)
    unet = _tiny_text_unet().eval()
    empty, cond = torch.randn(1, 5, 16), torch.randn(3, 5, 16)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([20, 400, 900])
    with torch.no_grad():
        plain = predict_eps(unet, x, t, cond)
        uncond = predict_eps(unet, x, t, empty.expand(3, 5, 16))
        torch.testing.assert_close(GuidedScore(unet, empty, 1.0)(x, t, cond), plain)
        torch.testing.assert_close(GuidedScore(unet, empty, 4.5)(x, t, cond), uncond + 4.5 * (plain - uncond),
                                   rtol=1e-4, atol=1e-4)


def test_paper_preset_builds():
    config = ExperimentConfig.paper()
    assert config.sfd.lr_gen == 1e-5
    assert config.sfd.lambda_forget_gen == 0.01
    assert config.sfd.n_iters == 50_000
    unet = build_teacher_unet(config, sample_size=32, in_channels=1, num_classes=10)
    n_params = sum(p.numel() for p in unet.parameters())
    # The DDPM paper's CIFAR-10 UNet, the same layout with 3 channels and no class embedding, has 35.7 M parameters.
    assert 30e6 < n_params < 40e6, n_params
    assert unet.config.norm_num_groups == 32
    with torch.no_grad():
        eps = predict_eps(unet, torch.randn(1, 1, 32, 32), torch.tensor([440]), torch.tensor([3]))
    assert eps.shape == (1, 1, 32, 32)
    text_config = concept_forgetting_config()
    assert text_config.t_init == 625
    assert text_config.alpha == 1.0
    assert text_config.lr_gen == 1e-6


def test_decode_latents_shape_and_range():
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    latents = 3 * torch.randn(2, 4, 8, 8)
    images = decode_latents(vae, latents)
    assert images.shape == (2, 3, 16, 16)
    assert images.abs().max() <= 1.0
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)


def test_results_table_rows_and_columns():
    metrics = {"sid": {"per_class_acc": [0.99, 0.95], "forget_acc": 0.99, "override_rate": 0.0, "remain_acc": 0.95,
                       "frechet_remain": 80.4, "frechet_per_class": [38.2, 80.4], "frechet_forget_to_override": 3100.0},
               "sfd": {"per_class_acc": [0.0, 0.97], "forget_acc": 0.0, "override_rate": 0.96, "remain_acc": 0.97,
                       "frechet_remain": 95.0, "frechet_per_class": [2900.0, 95.0], "frechet_forget_to_override": 52.0}}
    accuracy, distances = results_table(metrics, forget_label=0, override_label=1).split("\n\n")
    accuracy_lines, distance_lines = accuracy.splitlines(), distances.strip().splitlines()
    assert len(accuracy_lines) == 4
    assert len(distance_lines) == 4
    for lines in (accuracy_lines, distance_lines):
        assert len({line.count("|") for line in lines}) == 1
    assert accuracy_lines[3] == "| SFD one-step | 0.00 | 0.97 | 0.00 | 0.96 | 0.970 | 95 |"
    assert distance_lines[2] == "| SiD one-step | 38 | 80 | 3100 |"


@pytest.mark.parametrize("name, value, message", [
    ("lambda_forget_gen", float("nan"), "lambda_forget_gen must be a finite weight >= 0"),
    ("lambda_forget_fake", -0.5, "lambda_forget_fake must be a finite weight >= 0"),
    ("lambda_remain_gen", float("inf"), "lambda_remain_gen must be a finite weight >= 0"),
    ("lambda_remain_fake", -1.0, "lambda_remain_fake must be a finite weight >= 0"),
    ("lr_fake", 0.0, "lr_fake must be a finite learning rate > 0"),
    ("lr_gen", float("nan"), "lr_gen must be a finite learning rate > 0"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("n_iters", -3, "n_iters must be an integer >= 1"),
    ("ema_decay", 1.0, r"ema_decay must lie in \[0, 1\)"),
    ("t_min", 712, "t_min below t_max"),
])
def test_config_rejects_bad_values(name, value, message):
    with pytest.raises(ValueError, match=message):
        SFDConfig.small(**{name: value})


def test_experiment_config_rejects_bad_sizes():
    for name in ("teacher_steps", "teacher_batch_size", "classifier_steps", "classifier_batch_size", "ddim_steps",
                 "eval_samples_per_class", "curve_samples_per_class", "eval_every"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            ExperimentConfig.small(**{name: 0})


@pytest.mark.parametrize("options, message", [
    ({"steps": "2.5"}, "steps must be an integer"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"steps": "abc"}, "Option steps must be an integer, got 'abc'"),
    ({"steps": "-3"}, "n_iters must be an integer >= 1"),
    ({"lr": "-1"}, "lr_fake must be a finite learning rate > 0"),
    ({"lambda_forget": "nan"}, "Option lambda_forget must be a finite number, got 'nan'"),
    ({"lambda_forget": "-0.5"}, "lambda_forget_fake must be a finite weight"),
    ({"lambda_forget": True}, "lambda_forget must be a number"),
    ({"eval_samples_per_class": "0"}, "eval_samples_per_class must be an integer >= 1"),
    ({"override_label": "none"}, "needs an override_label"),
])
def test_experiment_options_rejected(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        experiment_config("small", options)


def test_experiment_options_random_override():
    config = experiment_config("small", {"override_label": "none", "override_mode": "rand"})
    assert config.sfd.override_label is None
    assert config.sfd.override_mode == "rand"


def test_sample_grid_with_fewer_images_than_row():
    import matplotlib.pyplot as plt
    images = torch.rand(40, 1, 8, 8) * 2 - 1  # 4 images for each of 10 classes, below per_row=8
    fig = plot_sample_grids({"SFD": images}, forget_label=0)
    assert fig.axes[0].images[0].get_array().shape == (80, 32)
    plt.close(fig)


def test_nonfinite_loss_names_the_loss(teacher):
    trainer = SFDTrainer(copy.deepcopy(teacher), SFDConfig.small(batch_size=4))
    with torch.no_grad():
        trainer.fake.conv_out.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="fake/remain loss is nan; lower lr_fake and lr_gen"):
        trainer.step(torch.tensor([1, 2, 3, 4]))


def test_generator_rejects_bad_inputs(teacher):
    trainer = SFDTrainer(teacher, SFDConfig.small(batch_size=4))
    with pytest.raises(ValueError, match=r"cond must lie in \[0, 11\)"):
        trainer.generator(torch.randn(2, 1, 8, 8), torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="z contains non-finite values"):
        trainer.generator(torch.full((2, 1, 8, 8), float("nan")), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="labels is empty"):
        trainer.step(torch.tensor([], dtype=torch.long))


def test_trainer_without_null_class():
    unet = class_conditional_unet(block_out_channels=(16, 32), num_classes=9, seed=0)  # 10 embeddings, no null
    trainer = SFDTrainer(unet, SFDConfig.small(batch_size=4))
    metrics = trainer.step(torch.tensor([1, 2, 3, 9]))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    with pytest.raises(ValueError, match=r"uncond \(the null label\) must lie in \[0, 10\)"):
        GuidedScore(unet, torch.tensor([10]), guidance_scale=2.0)
