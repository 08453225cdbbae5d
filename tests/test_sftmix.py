"""Tests of alignbook.sftmix: the Mixup regulariser's oracles, the confidence machinery and short end-to-end runs."""
import math

import pytest
import torch
import torch.nn.functional as F

from alignbook.core import token_logps
from alignbook.models import load_tokenizer, tiny_causal_lm
from alignbook.sftmix import (
    ConfidencePairedBatchSampler, NTPLoss, SFTData, SFTMixConfig, SFTMixLoss, ShuffledBatchSampler, StepBatches,
    TrainingDynamics, TrainingDynamicsCallback, compact_vocab, config_with_options, confidence_from_perplexity,
    corrupt_responses, evaluate_nll, expected_mixup_entropy, lm_head_inputs, load_sft_data, model_inputs, ntp_loss,
    response_nll, response_states, sample_lambdas, sequence_perplexity, sftmix_loss, sftmix_regularizer,
    split_by_confidence, train_sftmix,
)

VOCAB, WIDTH = 13, 8


def _pair_batch(seed=0):
    "Random LM-head inputs and labels: 2 pairs with different prompt lengths and left and right padding."
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 10, WIDTH, generator=g, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (4, 10), generator=g)
    labels[0, :2] = -100
    labels[0, 8:] = -100
    labels[1, :4] = -100
    labels[2, :6] = -100
    labels[3, :1] = -100
    labels[3, 6:] = -100
    head = torch.nn.Linear(WIDTH, VOCAB, bias=False).double()
    torch.nn.init.normal_(head.weight, generator=g)
    return hidden, labels, head


def _naive_pair_losses(hidden, labels, weight, lambdas):
    "Soft-target cross-entropy per pair with explicit one-hot targets and Python loops."
    pairs, losses = len(lambdas), []
    for k in range(pairs):
        positions = [[p for p in range(labels.shape[1] - 1) if labels[r, p + 1] != -100] for r in (k, k + pairs)]
        n = min(len(positions[0]), len(positions[1]))
        z_c, z_u = hidden[k, positions[0][:n]], hidden[k + pairs, positions[1][:n]]
        y_c = labels[k, [p + 1 for p in positions[0][:n]]]
        y_u = labels[k + pairs, [p + 1 for p in positions[1][:n]]]
        lam = lambdas[k]
        soft = lam * F.one_hot(y_c, VOCAB) + (1 - lam) * F.one_hot(y_u, VOCAB)
        logits = (lam * z_c + (1 - lam) * z_u) @ weight.T
        losses.append(-(soft * logits.log_softmax(-1)).sum(-1).mean())
    return torch.stack(losses)


def _own_cross_entropy(hidden, labels, head, row, n):
    logps, mask = token_logps(head(hidden[row:row + 1]), labels[row:row + 1])
    return -logps[mask][:n].mean()


def _tiny_lm(arch="gpt2", vocab=50):
    return tiny_causal_lm(arch, vocab_size=vocab, hidden_size=16, num_heads=2, max_positions=32,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if arch == "gpt2" else \
        tiny_causal_lm(arch, vocab_size=vocab, hidden_size=16, num_heads=2, max_positions=32)


def _token_batch(vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(0, vocab, (4, 12), generator=g),
             "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :4] = -100
    batch["labels"][1, 10:] = -100
    batch["attention_mask"][1, 10:] = 0
    return batch


# --- the regulariser -------------------------------------------------------------------------------------------

def test_regularizer_matches_soft_target_loop():
    hidden, labels, head = _pair_batch()
    lambdas = torch.tensor([0.25, 0.9], dtype=torch.float64)
    loss, _, pair_losses = sftmix_regularizer(hidden, labels, head, lambdas=lambdas)
    torch.testing.assert_close(pair_losses, _naive_pair_losses(hidden, labels, head.weight, lambdas).float())
    torch.testing.assert_close(loss, pair_losses.mean())


@pytest.mark.parametrize("lam, rows", [(1.0, (0, 1)), (0.0, (2, 3))])
def test_regularizer_limit_lambda(lam, rows):
    hidden, labels, head = _pair_batch()
    _, targets, lengths = response_states(hidden, labels)
    aligned = torch.minimum(lengths[:2], lengths[2:]).tolist()
    _, _, pair_losses = sftmix_regularizer(hidden, labels, head, lambdas=torch.full((2,), lam))
    expected = torch.stack([_own_cross_entropy(hidden, labels, head, r, n) for r, n in zip(rows, aligned)])
    torch.testing.assert_close(pair_losses, expected.float())


def test_regularizer_target_linearity():
    hidden, labels, head = _pair_batch(seed=3)
    lam = torch.tensor([0.3, 0.6], dtype=torch.float64)
    states, targets, lengths = response_states(hidden, labels)
    n = torch.minimum(lengths[:2], lengths[2:])
    _, _, pair_losses = sftmix_regularizer(hidden, labels, head, lambdas=lam)
    for k in range(2):
        mixed = lam[k] * states[k, :n[k]] + (1 - lam[k]) * states[k + 2, :n[k]]
        ce_c = F.cross_entropy(head(mixed), targets[k, :n[k]])
        ce_u = F.cross_entropy(head(mixed), targets[k + 2, :n[k]])
        torch.testing.assert_close(pair_losses[k].double(), lam[k] * ce_c + (1 - lam[k]) * ce_u)


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.77, 1.0])
def test_regularizer_self_pair_is_ntp(lam):
    hidden, labels, head = _pair_batch()
    same_hidden, same_labels = torch.cat([hidden[:2], hidden[:2]]), torch.cat([labels[:2], labels[:2]])
    _, _, pair_losses = sftmix_regularizer(same_hidden, same_labels, head, lambdas=torch.full((2,), lam))
    _, _, lengths = response_states(hidden, labels)
    expected = torch.stack([_own_cross_entropy(hidden, labels, head, r, int(lengths[r])) for r in (0, 1)])
    torch.testing.assert_close(pair_losses, expected.float())


def test_regularizer_is_not_reweighting():
    hidden, labels, head = _pair_batch(seed=5)
    lam = torch.tensor([0.4, 0.7], dtype=torch.float64)
    loss, _, _ = sftmix_regularizer(hidden, labels, head, lambdas=lam)
    (grad_mix,) = torch.autograd.grad(loss, head.weight)
    _, _, lengths = response_states(hidden, labels)
    n = torch.minimum(lengths[:2], lengths[2:]).tolist()
    reweighted = sum(lam[k] * _own_cross_entropy(hidden, labels, head, k, n[k])
                     + (1 - lam[k]) * _own_cross_entropy(hidden, labels, head, k + 2, n[k]) for k in range(2)) / 2
    (grad_reweighted,) = torch.autograd.grad(reweighted, head.weight)
    assert (grad_mix - grad_reweighted).abs().max() > 1e-3


def test_regularizer_gradient_only_on_aligned_positions():
    hidden, labels, head = _pair_batch()
    hidden = hidden.clone().requires_grad_()
    loss, _, _ = sftmix_regularizer(hidden, labels, head, lambdas=torch.tensor([0.5, 0.5]))
    (grad,) = torch.autograd.grad(loss, hidden)
    # Response-predicting positions: row 0 -> 1..6, row 1 -> 3..8, row 2 -> 5..8, row 3 -> 0..4.
    # Aligned lengths: pair (0, 2) min(6, 4) = 4, pair (1, 3) min(6, 5) = 5.
    expected = {0: [1, 2, 3, 4], 1: [3, 4, 5, 6, 7], 2: [5, 6, 7, 8], 3: [0, 1, 2, 3, 4]}
    for row, positions in expected.items():
        assert (grad[row].abs().sum(-1) > 0).nonzero().flatten().tolist() == positions


def test_regularizer_entropy_floor():
    hidden, labels, head = _pair_batch(seed=7)
    lam = torch.tensor([0.35, 0.8])
    _, targets, lengths = response_states(hidden, labels)
    n = torch.minimum(lengths[:2], lengths[2:])
    entropy = -(lam * lam.log() + (1 - lam) * (1 - lam).log())
    floor = torch.stack([entropy[k] * (targets[k, :n[k]] != targets[k + 2, :n[k]]).float().mean() for k in range(2)])
    _, _, pair_losses = sftmix_regularizer(hidden, labels, head, lambdas=lam)
    assert (pair_losses >= floor - 1e-6).all()
    width = int(n.max())
    soft = lam[:, None, None] * F.one_hot(targets[:2, :width].clamp_min(0), VOCAB) \
        + (1 - lam[:, None, None]) * F.one_hot(targets[2:, :width].clamp_min(0), VOCAB)

    class FixedLogits(torch.nn.Module):
        def forward(self, states):
            return soft.clamp_min(1e-30).log()

    _, _, optimal = sftmix_regularizer(hidden, labels, FixedLogits(), lambdas=lam)
    torch.testing.assert_close(optimal, floor, rtol=1e-5, atol=1e-5)


def test_regularizer_chunked_and_bf16_agree():
    hidden, labels, head = _pair_batch()
    hidden, head = hidden.float(), head.float()
    lam = torch.tensor([0.3, 0.6])
    full, _, _ = sftmix_regularizer(hidden, labels, head, lambdas=lam)
    chunked, _, _ = sftmix_regularizer(hidden, labels, head, lambdas=lam, chunk_size=3)
    torch.testing.assert_close(full, chunked)
    half, _, _ = sftmix_regularizer(hidden.bfloat16(), labels, head.bfloat16(), lambdas=lam)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.03, atol=0.03)


def test_regularizer_token_reduction():
    hidden, labels, head = _pair_batch()
    lam = torch.tensor([0.3, 0.6])
    token_loss, _, pair_losses = sftmix_regularizer(hidden, labels, head, lambdas=lam, reduction="token")
    torch.testing.assert_close(token_loss, (4 * pair_losses[0] + 5 * pair_losses[1]) / 9)


def test_regularizer_bad_input():
    hidden, labels, head = _pair_batch()
    with pytest.raises(ValueError, match="even number"):
        sftmix_regularizer(hidden[:3], labels[:3], head)
    with pytest.raises(ValueError, match="alpha=0"):
        sftmix_regularizer(hidden, labels, head, alpha=0)
    empty = labels.clone()
    empty[2] = -100
    with pytest.raises(ValueError, match=r"Rows \[2\] have no response tokens"):
        sftmix_regularizer(hidden, empty, head)
    with pytest.raises(ValueError, match="Unknown reduction"):
        sftmix_regularizer(hidden, labels, head, reduction="sum")


# --- lambdas ---------------------------------------------------------------------------------------------------

def test_lambdas_distribution():
    from scipy import stats
    g = torch.Generator().manual_seed(0)
    draws = sample_lambdas(20000, 0.5, g)
    assert draws.min() >= 0
    assert draws.max() <= 1
    assert abs(float(draws.mean()) - 0.5) < 0.01
    assert abs(float((draws < 0.1).float().mean() - (draws > 0.9).float().mean())) < 0.01
    assert stats.kstest(sample_lambdas(5000, 1.0, g).numpy(), "uniform").pvalue > 0.01
    entropy = -(draws * draws.log() + (1 - draws) * (1 - draws).log()).nan_to_num(0.0)
    assert abs(float(entropy.mean()) - (2 * math.log(2) - 1)) < 0.01
    assert abs(expected_mixup_entropy(0.5) - (2 * math.log(2) - 1)) < 1e-12


def test_lambdas_reproducible_and_per_batch():
    first = sample_lambdas(6, 0.5, torch.Generator().manual_seed(4))
    second = sample_lambdas(6, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert sample_lambdas(6, 0.5, torch.Generator().manual_seed(4), "batch").unique().numel() == 1


# --- the loss on real transformers models ----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_lm_head_inputs_give_model_logits(arch):
    model = _tiny_lm(arch).eval()
    batch = _token_batch()
    with torch.no_grad():
        hidden, head = lm_head_inputs(model, batch)
        logits = model(**model_inputs(batch)).logits
        states, _, _ = response_states(hidden, batch["labels"])
        expected, _, _ = response_states(logits, batch["labels"])
        assert torch.equal(head(states), expected)


def test_mu_zero_is_plain_sft():
    model = _tiny_lm().eval()
    batch = _token_batch()
    out = sftmix_loss(model, batch, mu=0.0, generator=torch.Generator().manual_seed(0))
    plain = ntp_loss(model(**model_inputs(batch)).logits, batch["labels"])
    assert out["loss"].item() == plain.item()
    hf_loss = model(**model_inputs(batch), labels=batch["labels"]).loss
    torch.testing.assert_close(out["loss"], hf_loss)
    grads_mix = torch.autograd.grad(out["loss"], list(model.parameters()))
    grads_plain = torch.autograd.grad(ntp_loss(model(**model_inputs(batch)).logits, batch["labels"]),
                                      list(model.parameters()))
    for a, b in zip(grads_mix, grads_plain):
        assert torch.equal(a, b)


def test_mixup_term_reaches_backbone():
    model = _tiny_lm().eval()
    out = sftmix_loss(model, _token_batch(), lambdas=torch.tensor([0.4, 0.6]))
    grads = torch.autograd.grad(out["mixup_loss"], [model.transformer.h[0].attn.c_attn.weight,
                                                     model.transformer.wte.weight])
    assert all(g.abs().sum() > 0 for g in grads)


def test_sftmix_loss_bad_input():
    model = _tiny_lm()
    batch = _token_batch()
    with pytest.raises(ValueError, match="mu=-0.5"):
        sftmix_loss(model, batch, mu=-0.5)
    with pytest.raises(ValueError, match="even number"):
        sftmix_loss(model, {k: v[:3] for k, v in batch.items()})
    with pytest.raises(TypeError, match="not a Hugging Face causal LM"):
        lm_head_inputs(model.transformer, batch)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        lm_head_inputs(model, batch)
    with pytest.raises(ValueError, match="alpha=0"):
        SFTMixLoss(alpha=0.0)


# --- perplexity, dynamics, split, sampler ---------------------------------------------------------------------

def test_perplexity_oracles():
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 6, -100, -100]])
    logits = torch.full((2, 5, 7), -1e4)
    logits[:, :-1].scatter_(-1, labels[:, 1:].clamp_min(0).unsqueeze(-1), 0.0)
    nll, prob = response_nll(logits, labels)
    torch.testing.assert_close(nll.exp(), torch.ones(2))
    torch.testing.assert_close(prob, torch.ones(2))
    assert torch.equal(confidence_from_perplexity(nll.exp()[None]), -torch.ones(2))
    random_logits = torch.randn(2, 5, 7)
    changed_prompt = labels.clone()
    changed_prompt[0, 1] = -100
    assert torch.equal(response_nll(random_logits, labels)[0], response_nll(random_logits, changed_prompt)[0])
    single = torch.tensor([[0.4, 2.0]])
    torch.testing.assert_close(confidence_from_perplexity(single.exp()), -single[0].exp())


def test_dynamics_bad_input():
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        TrainingDynamics(10, 1)
    dynamics = TrainingDynamics(3, 2)
    with pytest.raises(ValueError, match="never recorded"):
        dynamics.perplexities
    with pytest.raises(ValueError, match="outside"):
        dynamics.commit(2)


def test_split_partition_and_order():
    g = torch.Generator().manual_seed(0)
    confidence = torch.randn(11, generator=g)
    confident, unconfident = split_by_confidence(confidence)
    assert len(confident) == 6
    assert len(unconfident) == 5
    assert sorted(confident.tolist() + unconfident.tolist()) == list(range(11))
    assert confidence[confident].min() >= confidence[unconfident].max()
    ties = split_by_confidence(torch.zeros(5))
    assert ties[0].tolist() == [0, 1, 2]
    assert ties[1].tolist() == [3, 4]


def test_paired_sampler_layout():
    confident, unconfident = torch.arange(20, 31), torch.arange(0, 10)
    sampler = ConfidencePairedBatchSampler(confident, unconfident, batch_size=4, seed=1)
    batches = sampler.batches(0)
    assert len(batches) == 5
    for batch in batches:
        assert all(i >= 20 for i in batch[:2])
        assert all(i < 10 for i in batch[2:])
    assert sorted(i for b in batches for i in b[2:]) == list(range(10))
    assert batches == ConfidencePairedBatchSampler(confident, unconfident, 4, seed=1).batches(0)
    with pytest.raises(ValueError, match="must be even"):
        ConfidencePairedBatchSampler(confident, unconfident, batch_size=3)


# --- data and end-to-end runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_data():
    tokenizer = load_tokenizer("gpt2")
    train, held_out = load_sft_data(tokenizer, num_train=48, num_eval=16, max_length=40, max_prompt_length=20,
                                    vocab_size=256, seed=0)
    return tokenizer, train, held_out


def test_load_sft_data_shapes(small_data):
    _, train, held_out = small_data
    assert len(train) == 48
    assert len(held_out) == 16
    batch = train.collate([0, 5, 7])
    assert batch["input_ids"].max() < 256
    assert batch["index"].tolist() == [0, 5, 7]
    assert ((batch["labels"] != -100).sum(1) > 0).all()


def test_compact_vocab_and_corruption(small_data):
    tokenizer, train, _ = small_data
    id_map = compact_vocab(train.sequences, 10, len(tokenizer), keep=[tokenizer.eos_token_id])
    assert id_map[tokenizer.eos_token_id] == 0
    assert id_map.max() == 9
    assert (id_map < 9).sum() == 9
    noisy = corrupt_responses(train, 0.25, torch.arange(100, 200), seed=0)
    corrupted = [i for i, r in enumerate(noisy.rows) if r["corrupted"]]
    assert len(corrupted) == 12
    for i in corrupted:
        before, after = train.sequences[i][1], noisy.sequences[i][1]
        assert len(before) == len(after)
        assert before[-1] == after[-1]
        assert all(100 <= t < 200 for t in after[:-1])
    with pytest.raises(ValueError, match="fraction=1.0"):
        corrupt_responses(train, 1.0, torch.arange(5))


def test_forward_dynamics_match_second_pass(small_data):
    "With a zero learning rate the staged training forwards and a checkpoint pass score the same model."
    from alignbook.train import train
    _, data, _ = small_data
    model = tiny_causal_lm("gpt2", vocab_size=256, hidden_size=16, num_heads=2, max_positions=40,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    sampler = ShuffledBatchSampler(len(data), 8, seed=0, drop_last=False)
    dynamics = TrainingDynamics(len(data), 2)
    callback = TrainingDynamicsCallback(dynamics, "forward", steps_per_checkpoint=len(sampler))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train(model, NTPLoss(dynamics), StepBatches(data, sampler), 2 * len(sampler), optimizer=optimizer,
          callbacks=[callback], progress=False)
    perplexity, _ = sequence_perplexity(model, data.batches(16), len(data))
    torch.testing.assert_close(dynamics.perplexities[0], perplexity, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dynamics.perplexities[1], perplexity, rtol=1e-4, atol=1e-4)


def test_sftmix_training_lowers_loss(small_data):
    _, data, held_out = small_data
    config = SFTMixConfig(vocab_size=256, hidden_size=16, num_heads=2, max_length=40, batch_size=8, epochs=2,
                          lr=1e-2)
    model = tiny_causal_lm("gpt2", vocab_size=256, hidden_size=16, num_heads=2, max_positions=40,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    nll_before = evaluate_nll(model, data)
    history = train_sftmix(model, data, torch.arange(0, 24), torch.arange(24, 48), config, seed=0)
    assert len(history) == 2 * (48 // 8)
    assert all("loss/mixup" in h and "loss/ntp" in h for h in history)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert evaluate_nll(model, data) < nll_before


def test_config_options():
    config = config_with_options(SFTMixConfig.small(), {"num_seeds": 5, "noise_fractions": [0.0, 0.4]})
    assert config.num_seeds == 5
    assert config.noise_fractions == (0.0, 0.4)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['steps'\] for the sftmix chapter"):
        config_with_options(SFTMixConfig.small(), {"steps": 10})
    with pytest.raises(ValueError, match="Option num_seeds must be an integer, got 2.5"):
        config_with_options(SFTMixConfig.small(), {"num_seeds": 2.5})
    with pytest.raises(ValueError, match="at least 2"):
        SFTMixConfig(epochs=1)


def test_trainer_built_on_import():
    import transformers
    from alignbook.sftmix import SFTMixTrainer
    assert issubclass(SFTMixTrainer, transformers.Trainer)
    import alignbook.sftmix as module
    assert module.SFTMixTrainer is SFTMixTrainer
    with pytest.raises(AttributeError, match="no attribute 'NoSuchTrainer'"):
        module.NoSuchTrainer
