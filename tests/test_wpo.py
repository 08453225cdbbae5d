"""Agreement of `alignbook.wpo` with TRL's WPO weighting (`DPOConfig(use_weighting=True)`) on identical tiny inputs.

TRL 0.29 and later (1.16 when these tests were written) weights every pair by exp(mean_w + mean_l) with no clamp,
reading log sum_v p_v^2 from its fused LM head, so it must match `WPOLoss(clamp_max=None)`.
"""
import pytest
import torch

pytest.importorskip("trl")

from alignbook.wpo import WPOLoss
from test_preference import RTOL, make_batch, make_trl_trainer, our_logps, reset_accelerate_state  # noqa: F401


@torch.no_grad()
def _our_wpo_loss(policy, reference, batch, **kwargs):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref_logps, _ = our_logps(reference, batch)
    return WPOLoss(**kwargs)(logits, labels, ref_logps)


def _greedy_batch(policy, batch):
    "Replace the response tokens by the policy's greedy choices, so that the weights are near 1, not ~1/V."
    ids = batch["input_ids"].clone()
    with torch.no_grad():
        for t in range(3, ids.shape[1]):
            logits = policy(input_ids=ids[:, :t], attention_mask=batch["attention_mask"][:, :t]).logits
            ids[:, t] = logits[:, -1].argmax(-1)
    # the rejected rows take a different, sampled continuation so that pairs differ
    n = ids.shape[0] // 2
    ids[n:, 3:] = batch["input_ids"][n:, 3:]
    return {**batch, "input_ids": ids}


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_wpo_loss_matches_trl(loss_type, beta):
    trainer, policy, reference = make_trl_trainer(loss_type, beta=beta, use_weighting=True)
    batch = _greedy_batch(policy, make_batch(policy.config.vocab_size))
    expected = trainer._compute_loss(trainer.model, batch, False).detach()
    base = {"sigmoid": "dpo", "ipo": "ipo"}[loss_type]
    ours, metrics = _our_wpo_loss(policy, reference, batch, base=base, beta=beta, clamp_max=None)
    assert 1e-3 < metrics["weights/mean"], "weights must not vanish for the comparison to mean anything"
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=0.0)



def test_controlled_task_weight_gap_and_trend():
    "On the synthetic task, on-policy pairs outweigh off-policy ones and training separates chosen from rejected."
    from alignbook.wpo import WPOExperimentConfig, run_controlled_comparison
    config = WPOExperimentConfig(n_sft=2000, sft_steps=100, n_pairs=400, steps=60, batch_size=32, eval_every=30,
                                 n_eval_samples=128, n_weight_pairs=64, hh=False)
    run = run_controlled_comparison(config, frac_off=0.5, seed=0)
    start = run["initial"]
    end = [h for h in run["wpo"] if "eval/kl" in h][-1]
    assert start["weights/on_pair"] > 10 * start["weights/off_pair"]
    assert end["weights/on_pair"] < start["weights/on_pair"]
    start_ratio = start["weights/on_chosen"] / start["weights/on_rejected"]
    end_ratio = end["weights/on_chosen"] / end["weights/on_rejected"]
    assert end_ratio > start_ratio
    assert end["eval/kl"] > 0
    assert end["eval/reward"] > start["eval/reward"]


def test_real_preset_path_with_tiny_model(tmp_path):
    "The real preset's reproduce path (study, figure, metrics) on a tiny random Llama and two pairs per source."
    import json
    import math

    from alignbook.reproduce import ReproduceConfig, run_chapter
    options = {"frac_off": "", "real_study.model": "tiny-llama", "real_study.n_alpaca": "3", "real_study.n_hh": "3",
               "real_study.n_eval": "2", "real_study.max_prompt_length": "16", "real_study.max_response_length": "8",
               "real_study.n_sample_prompts": "4", "real_study.steps": "2", "real_study.batch_size": "2",
               "real_study.n_kl_prompts": "2", "real_study.eval_every": "1"}
    result = run_chapter(ReproduceConfig("wpo", preset="real", out_dir=tmp_path, progress=False, options=options))
    assert result.status == "ok", result.error
    metrics = json.loads((tmp_path / "wpo" / "metrics.json").read_text())
    study = metrics["real_study"]
    assert study["sizes"] == {"train_pairs": 4, "eval_pairs": 2, "sample_prompts": 4, "kl_prompts": 2}
    assert (tmp_path / "wpo" / "wpo_real_study.png").is_file()
    for source in ("alpaca", "hh", "all"):
        report = study["weights"][source]
        assert report["own"]["n"] == 2 * report["chosen"]["n"]
        # chosen and rejected sets have the same size, so the mean over both is the average of their means
        data_mean_log_w = 0.5 * (report["chosen"]["mean_log_w"] + report["rejected"]["mean_log_w"])
        expected_gap = math.exp(report["own"]["mean_log_w"] - data_mean_log_w)
        assert report["gap_response"] == pytest.approx(expected_gap, rel=1e-6)
        assert report["own"]["q10_w"] <= report["own"]["q50_w"] <= report["own"]["q90_w"]
    assert 0.0 <= study["dpo"]["eval/rewards/accuracies"] <= 1.0
    assert study["wpo"]["train/weights/mean_first"] <= 1.0
    assert study["reference"]["eval/kl"] == 0.0


def test_paper_preset_config():
    "The paper preset carries the official Llama-3-8B-Instruct hyperparameters without running anything."
    from alignbook.wpo import wpo_experiment_config
    study = wpo_experiment_config("paper").real_study
    assert study.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert (study.beta, study.lr) == (0.01, 1e-6)
    assert study.batch_size * study.grad_accum == 128
    assert (study.max_prompt_length, study.max_prompt_length + study.max_response_length) == (1800, 2048)
    assert study.train_last_layers is None
    overridden = wpo_experiment_config("real", {"real_study.steps": "3", "real_study.train_last_layers": "none"})
    assert (overridden.real_study.steps, overridden.real_study.train_last_layers) == (3, None)
    with pytest.raises(ValueError, match="real_study.<field>"):
        wpo_experiment_config("real", {"real_study.stepz": "3"})
    with pytest.raises(ValueError, match="needs the pretrained-model study"):
        wpo_experiment_config("small", {"real_study.steps": "3"})
