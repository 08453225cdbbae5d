"""Oracle tests for `alignbook.treg`: limiting cases, the per-token gradient identity, invariances and the toy task."""
import copy
import math

import pytest
import torch

from alignbook.core import sequence_logps, token_logps
from alignbook.data import PairCollator
from alignbook.models import frozen_copy, load_tokenizer, tiny_causal_lm
from alignbook.preference import dpo_loss, simpo_loss
from alignbook.reproduce import ReproduceConfig
from alignbook.train import train
from alignbook.treg import (
    ControlPairLoss, ControlTabularPolicy, TREGConfig, TREGLoss, align_token_rewards, build_contrastive_prompts,
    compute_token_rewards, control_token_rewards, dpo_reg_loss, encode_prompt, encode_response,
    make_control_pairs, make_control_token_task, reference_sequence_logps, roc_auc, run_control_experiment,
    score_response_tokens, sequence_weight, simpo_reg_loss, summarize_control_runs, token_rewards,
    treg_regularizer, reproduce,
)


def _pair_batch(seed: int, batch: int = 3, width: int = 6) -> dict:
    """Random float64 per-token inputs with different response lengths on each side."""
    g = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.tensor([6, 4, 2, 5, 3])[:batch]
    rejected_lengths = torch.tensor([3, 6, 5, 1, 4])[:batch]
    mask_c = (torch.arange(width)[None] < chosen_lengths[:, None]).double()
    mask_r = (torch.arange(width)[None] < rejected_lengths[:, None]).double()

    def rand(mask):
        return -3 * torch.rand(batch, width, generator=g, dtype=torch.float64) * mask

    ref_c, ref_r = rand(mask_c), rand(mask_r)
    return dict(
        policy_chosen_token_logps=rand(mask_c).requires_grad_(),
        policy_rejected_token_logps=rand(mask_r).requires_grad_(),
        reference_chosen_logps=ref_c.sum(-1), reference_rejected_logps=ref_r.sum(-1),
        chosen_token_rewards=token_rewards(rand(mask_c), rand(mask_c), mask_c),
        rejected_token_rewards=token_rewards(rand(mask_r), rand(mask_r), mask_r),
        chosen_mask=mask_c, rejected_mask=mask_r,
        reference_chosen_token_logps=ref_c, reference_rejected_token_logps=ref_r,
    )


def _policy_grads(loss, batch):
    leaves = [batch["policy_chosen_token_logps"], batch["policy_rejected_token_logps"]]
    return torch.autograd.grad(loss, leaves, retain_graph=True)


def _dpo_reference(batch, beta):
    return dpo_loss(sequence_logps(batch["policy_chosen_token_logps"], batch["chosen_mask"]),
                    sequence_logps(batch["policy_rejected_token_logps"], batch["rejected_mask"]),
                    batch["reference_chosen_logps"], batch["reference_rejected_logps"], beta=beta)


def test_token_rewards_bounds_and_antisymmetry():
    g = torch.Generator().manual_seed(0)
    plus, minus = -5 * torch.rand(4, 7, generator=g), -5 * torch.rand(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.3
    rewards = token_rewards(plus, minus, mask)
    assert (rewards > -0.5).all()
    assert (rewards < 0.5).all()
    torch.testing.assert_close(token_rewards(minus, plus, mask), -rewards)
    assert (rewards[~mask] == 0).all()
    assert not token_rewards(plus.requires_grad_(), minus, mask).requires_grad


@pytest.mark.parametrize("seed", [0, 1])
def test_alpha_zero_is_dpo(seed):
    batch = _pair_batch(seed)
    loss, _ = dpo_reg_loss(**batch, beta=0.1, alpha=0.0)
    expected = _dpo_reference(batch, 0.1)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(_policy_grads(loss, batch), _policy_grads(expected, batch)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_neutral_evaluator_is_dpo():
    batch = _pair_batch(2)
    same = -2 * torch.ones_like(batch["chosen_token_rewards"])
    batch["chosen_token_rewards"] = token_rewards(same, same, batch["chosen_mask"])
    batch["rejected_token_rewards"] = token_rewards(same, same, batch["rejected_mask"])
    loss, _ = dpo_reg_loss(**batch, beta=0.1, alpha=1.7)
    expected = _dpo_reference(batch, 0.1)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(_policy_grads(loss, batch), _policy_grads(expected, batch)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta,alpha", [(0.1, 0.5), (0.01, 0.25), (0.5, 1.0)])
def test_gradient_identity_per_token(beta, alpha):
    batch = _pair_batch(3, batch=5)
    loss, _ = dpo_reg_loss(**batch, beta=beta, alpha=alpha)
    grad_c, grad_r = _policy_grads(loss, batch)
    h = ((sequence_logps(batch["policy_chosen_token_logps"], batch["chosen_mask"]) - batch["reference_chosen_logps"])
         - (sequence_logps(batch["policy_rejected_token_logps"], batch["rejected_mask"])
            - batch["reference_rejected_logps"])).detach()
    w = (1 - torch.sigmoid(beta * h))[:, None]
    n = h.shape[0]
    want_c = -beta * w * (1 + alpha * batch["chosen_token_rewards"]) * batch["chosen_mask"] / n
    want_r = beta * w * (1 - alpha * batch["rejected_token_rewards"]) * batch["rejected_mask"] / n
    torch.testing.assert_close(grad_c, want_c, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_r, want_r, rtol=1e-6, atol=0)


def test_simpo_reg_gradient_identity():
    batch = {k: v for k, v in _pair_batch(4).items() if not k.startswith("reference")}
    beta, ratio, alpha = 2.0, 0.25, 0.6
    loss, _ = simpo_reg_loss(**batch, beta=beta, gamma_beta_ratio=ratio, alpha=alpha)
    grad_c, grad_r = _policy_grads(loss, batch)
    avg_c = sequence_logps(batch["policy_chosen_token_logps"], batch["chosen_mask"], average=True)
    avg_r = sequence_logps(batch["policy_rejected_token_logps"], batch["rejected_mask"], average=True)
    w = torch.sigmoid(-(beta * (avg_c - avg_r) - beta * ratio)).detach()[:, None]
    len_c = batch["chosen_mask"].sum(-1, keepdim=True)
    len_r = batch["rejected_mask"].sum(-1, keepdim=True)
    want_c = -beta / len_c * w * (1 + alpha * batch["chosen_token_rewards"]) * batch["chosen_mask"] / 3
    want_r = beta / len_r * w * (1 - alpha * batch["rejected_token_rewards"]) * batch["rejected_mask"] / 3
    torch.testing.assert_close(grad_c, want_c, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_r, want_r, rtol=1e-6, atol=0)
    alpha_zero, _ = simpo_reg_loss(**batch, beta=beta, gamma_beta_ratio=ratio, alpha=0.0)
    torch.testing.assert_close(alpha_zero, simpo_loss(avg_c, avg_r, beta=beta, gamma_beta_ratio=ratio))


def test_value_at_initialisation():
    batch = _pair_batch(5)
    batch["reference_chosen_logps"] = batch["policy_chosen_token_logps"].detach().sum(-1)
    batch["reference_rejected_logps"] = batch["policy_rejected_token_logps"].detach().sum(-1)
    per_pair, metrics = dpo_reg_loss(**batch, beta=0.1, alpha=0.4, reduction="none")
    reg = (treg_regularizer(batch["policy_chosen_token_logps"], batch["chosen_token_rewards"], batch["chosen_mask"], 0.1)
           + treg_regularizer(batch["policy_rejected_token_logps"], batch["rejected_token_rewards"],
                              batch["rejected_mask"], 0.1))
    torch.testing.assert_close(per_pair, math.log(2) + 0.2 * reg)
    assert metrics["reg/weight_mean"] == 0.5


def test_static_weighting_difference():
    batch = _pair_batch(6)
    static, _ = dpo_reg_loss(**batch, alpha=0.8, weighting="static", reduction="none")
    dynamic, _ = dpo_reg_loss(**batch, alpha=0.8, weighting="dynamic", reduction="none")
    reg = (treg_regularizer(batch["policy_chosen_token_logps"], batch["chosen_token_rewards"], batch["chosen_mask"])
           + treg_regularizer(batch["policy_rejected_token_logps"], batch["rejected_token_rewards"],
                              batch["rejected_mask"]))
    chosen_rewards = 0.1 * (batch["policy_chosen_token_logps"].sum(-1) - batch["reference_chosen_logps"])
    rejected_rewards = 0.1 * (batch["policy_rejected_token_logps"].sum(-1) - batch["reference_rejected_logps"])
    w = sequence_weight(chosen_rewards, rejected_rewards)
    torch.testing.assert_close(static - dynamic, 0.8 * (1 - w) * reg)
    assert not w.requires_grad


def test_reference_term_changes_value_not_gradient():
    batch = _pair_batch(7)
    args = (batch["policy_chosen_token_logps"], batch["chosen_token_rewards"], batch["chosen_mask"], 0.1)
    plain = treg_regularizer(*args)
    with_ref = treg_regularizer(*args, reference_token_logps=batch["reference_chosen_token_logps"])
    shift = 0.1 * (batch["chosen_token_rewards"] * batch["reference_chosen_token_logps"]).sum(-1)
    torch.testing.assert_close(with_ref - plain, shift)
    grad_plain, = torch.autograd.grad(plain.sum(), batch["policy_chosen_token_logps"])
    grad_ref, = torch.autograd.grad(with_ref.sum(), batch["policy_chosen_token_logps"])
    torch.testing.assert_close(grad_plain, grad_ref)


def test_padding_invariance():
    batch = _pair_batch(8)
    padded = dict(batch)
    for side in ("chosen", "rejected"):
        for key, fill in ((f"policy_{side}_token_logps", -9.0), (f"{side}_token_rewards", 0.3), (f"{side}_mask", 0.0),
                          (f"reference_{side}_token_logps", -4.0)):
            value = batch[key].detach()
            padded[key] = torch.cat([value, torch.full((value.shape[0], 4), fill, dtype=value.dtype)], 1)
    loss, metrics = dpo_reg_loss(**batch, alpha=0.5)
    padded_loss, padded_metrics = dpo_reg_loss(**padded, alpha=0.5)
    torch.testing.assert_close(padded_loss, loss.detach())
    assert metrics == pytest.approx(padded_metrics)


def test_bad_inputs_raise():
    batch = _pair_batch(9)
    with pytest.raises(ValueError, match="alpha is a regularisation strength"):
        dpo_reg_loss(**batch, alpha=-0.5)
    with pytest.raises(ValueError, match="chosen_token_rewards has shape"):
        dpo_reg_loss(**dict(batch, chosen_token_rewards=batch["chosen_token_rewards"][:, :3]))
    with pytest.raises(ValueError, match="Unknown weighting"):
        dpo_reg_loss(**batch, weighting="soft")
    with pytest.raises(ValueError, match="placeholder"):
        build_contrastive_prompts("Explain X.", better_template="Be good.")
    single_pair = {k: v[:1] for k, v in batch.items()}
    assert dpo_reg_loss(**single_pair)[0].shape == torch.Size([])


@pytest.fixture(scope="module")
def tiny():
    tokenizer = load_tokenizer("gpt2")
    model = tiny_causal_lm("gpt2", hidden_size=16, num_layers=1, num_heads=2, seed=0).eval()
    return tokenizer, model


def test_response_ids_identical_under_both_prompts(tiny):
    tokenizer, _ = tiny
    response = encode_response(tokenizer, "yes")
    assert tokenizer("Answer: yes")["input_ids"] != tokenizer("Answer: ")["input_ids"] + response
    better, worse = build_contrastive_prompts("Is 7 prime? Answer: ")
    for messages in (better, worse):
        ids = encode_prompt(tokenizer, messages) + response
        assert ids[-len(response):] == response


def test_compute_token_rewards_matches_policy_batch(tiny, tmp_path):
    tokenizer, model = tiny
    rows = [{"prompt": "Is 7 prime? Answer:", "chosen": " Yes.", "rejected": " No, it is not prime at all."},
            {"prompt": "Say hello.", "chosen": " Hello!", "rejected": " Bye."}]
    collator = PairCollator(tokenizer, max_length=32, max_prompt_length=16)
    batch = collator(rows)
    response_ids = [collator.encode(r["prompt"], r[k])[1] for k in ("chosen", "rejected") for r in rows]
    prompts = [r["prompt"] for k in ("chosen", "rejected") for r in rows]
    result = compute_token_rewards(model, tokenizer, prompts, response_ids, cache_dir=tmp_path, progress=False)
    response_counts = (batch["labels"][:, 1:] != -100).sum(-1).tolist()
    assert [len(r) for r in result.rewards] == response_counts
    cached = compute_token_rewards(model, tokenizer, prompts, response_ids, cache_dir=tmp_path, progress=False)
    for a, b in zip(result.rewards, cached.rewards):
        torch.testing.assert_close(a, b)
    batch["token_rewards"] = align_token_rewards(batch["labels"], result.rewards)
    batch["reference_logps"], _ = reference_sequence_logps(frozen_copy(model), batch)
    loss, metrics = TREGLoss(beta=0.1, alpha=1.0)(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, mask = token_logps(logits, batch["labels"])
    reg = treg_regularizer(logps, batch["token_rewards"], mask, beta=0.1)
    torch.testing.assert_close(loss, math.log(2) + 0.5 * (reg[:2] + reg[2:]).mean(), rtol=1e-5, atol=1e-6)
    assert metrics["reg/weight_mean"] == 0.5


def test_score_response_tokens_batch_matches_single(tiny):
    tokenizer, model = tiny
    prompts, responses = [[10, 11, 12], [13, 14]], [[20, 21], [22, 23, 24, 25]]
    batched = score_response_tokens(model, tokenizer, prompts, responses)
    for prompt, response, got in zip(prompts, responses, batched):
        single = score_response_tokens(model, tokenizer, [prompt], [response])[0]
        torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="zero tokens"):
        score_response_tokens(model, tokenizer, [[1]], [[]])


def test_control_task_token_rewards_auc():
    task = make_control_token_task(0)
    g = torch.Generator().manual_seed(1)
    reference = ControlTabularPolicy.fit(task, 5_000, generator=g)
    topics = torch.randint(task.n_topics, (500,), generator=g)
    responses = reference.sample("plain", topics, task.response_length, g)
    rewards = control_token_rewards(reference, topics, responses)
    assert roc_auc(rewards, ~task.is_bad(responses)) > 0.9


def test_control_alpha_zero_reproduces_dpo():
    task = make_control_token_task(0)
    g = torch.Generator().manual_seed(2)
    reference = ControlTabularPolicy.fit(task, 3_000, generator=g)
    pairs = make_control_pairs(task, reference, 600, g)
    index = torch.randint(len(pairs.topics), (15, 32), generator=g)

    def plain_dpo(policy, rows):
        topics = pairs.topics[rows]
        loss = dpo_loss(policy.token_logps("plain", topics, pairs.chosen[rows]).sum(-1),
                        policy.token_logps("plain", topics, pairs.rejected[rows]).sum(-1),
                        pairs.reference_chosen_token_logps[rows].sum(-1),
                        pairs.reference_rejected_token_logps[rows].sum(-1), beta=0.1)
        return loss, {}

    treg_policy, dpo_policy = copy.deepcopy(reference), copy.deepcopy(reference)
    train(treg_policy, ControlPairLoss(pairs, beta=0.1, alpha=0.0), lambda step: index[step], 15, lr=1e-2,
          progress=False, seed=0)
    train(dpo_policy, plain_dpo, lambda step: index[step], 15, lr=1e-2, progress=False, seed=0)
    torch.testing.assert_close(treg_policy.logits, dpo_policy.logits)
    assert not torch.allclose(dpo_policy.logits, reference.logits)


def test_control_treg_lowers_bad_rate_more():
    # Direction only, averaged over two seeds at the last checkpoint; magnitudes are recorded by the notebook.
    config = TREGConfig.small()
    config.seeds, config.steps, config.eval_every, config.alphas = (0, 1), 100, 50, (1.0,)
    config.samples_per_control, config.n_prompts, config.n_eval_samples = 5_000, 2_000, 2_000
    summary = summarize_control_runs(run_control_experiment(config, progress=False))
    dpo, treg = summary["per_alpha"][0.0], summary["per_alpha"][1.0]
    assert summary["reward_auc_min"] > 0.9
    assert dpo["bad_rate"] < dpo["bad_rate_initial"]
    assert treg["bad_rate"] < dpo["bad_rate"]
    assert treg["token_auc"] > dpo["token_auc"]


# A chat template in the style of ChatML, so the tiny model takes the chat-template branch like SmolLM2 does.
_TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_model_dir(tmp_path_factory):
    """A saved tiny Llama with the GPT-2 tokenizer and a chat template, loadable like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_chat_lm")
    tokenizer = load_tokenizer("gpt2")
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    tiny_causal_lm("llama", hidden_size=16, num_layers=1, num_heads=2).save_pretrained(folder)
    return folder


def test_real_preset_pipeline_on_tiny_model(tiny_chat_model_dir, tmp_path):
    # The real preset's code path (local AlpacaEval and hh-rlhf pairs, zero-shot study, token-reward cache,
    # DPO and DPO-REG fine-tune, figures) on a tiny model and a few pairs.
    options = {"model": str(tiny_chat_model_dir), "n_reward_pairs": 3, "n_train_pairs": 4, "n_eval_pairs": 2,
               "steps": 2, "eval_every": 2, "log_every": 1, "batch_size": 2, "max_length": 48,
               "max_prompt_length": 24, "reward_batch_size": 2}
    config = ReproduceConfig("treg", "real", out_dir=tmp_path, progress=False, options=options)
    metrics = reproduce(config)

    assert set(metrics["zero_shot"]) == {"alpaca_eval", "hh_rlhf"}
    for name, zero_shot in metrics["zero_shot"].items():
        assert zero_shot["n_pairs"] == 3, name
        assert 0.0 <= zero_shot["accuracy_mean_reward"] <= 1.0, name
        assert (tmp_path / "treg" / f"treg_token_strips_{name}.png").is_file()
    assert (tmp_path / "treg" / "treg_finetune.png").is_file()
    assert set(metrics["histories"]) == {"0.0", "0.5"}
    for history in metrics["histories"].values():
        # Both runs start from the reference, where every implicit reward is 0 and ties count half.
        assert history[0]["step"] == 0
        assert history[0]["eval/reward_accuracy"] == 0.5
        assert history[-1]["step"] == 2
        assert "eval/reward_accuracy" in history[-1]
    assert metrics["summary"]["baseline"] == metrics["finetune"]["0.0"]["eval/reward_accuracy"]
    assert metrics["summary"]["method"] == metrics["finetune"]["0.5"]["eval/reward_accuracy"]

    cache_files = list((tmp_path / "treg" / "token_reward_cache").iterdir())
    assert len(cache_files) == 3  # zero-shot sets and training pairs, since held-out pairs need no rewards


def test_real_preset_reward_precision_option():
    assert TREGConfig.real().reward_precision == "bf16"
    with pytest.raises(ValueError, match="reward_precision must be one of"):
        reproduce(ReproduceConfig("treg", "real", options={"reward_precision": "fp8"}))


def test_token_reward_batches_keep_input_order(tiny):
    # Scoring sorts responses by length, so check that every result still belongs to its own input.
    tokenizer, model = tiny
    prompts = ["A much longer prompt with many more words in it.", "Hi.", "Medium prompt here."]
    responses = [" ok", " a longer response than the first one", " mid"]
    together = compute_token_rewards(model, tokenizer, prompts, responses, batch_size=2, progress=False)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        alone = compute_token_rewards(model, tokenizer, [prompt], [response], progress=False)
        assert together.response_ids[i] == alone.response_ids[0]
        torch.testing.assert_close(together.rewards[i], alone.rewards[0], rtol=1e-5, atol=1e-5)


def test_bf16_token_rewards_match_float32(tiny, tmp_path):
    tokenizer, model = tiny
    prompts, responses = ["Is 7 prime?", "Say hello."], [" Yes, it is.", " Hello there!"]
    full = compute_token_rewards(model, tokenizer, prompts, responses, cache_dir=tmp_path, progress=False)
    half = compute_token_rewards(model, tokenizer, prompts, responses, cache_dir=tmp_path, progress=False,
                                 autocast_dtype=torch.bfloat16)
    assert len(list(tmp_path.iterdir())) == 2  # the precision is part of the cache key
    for a, b in zip(full.rewards, half.rewards):
        torch.testing.assert_close(a, b, rtol=0, atol=0.02)
