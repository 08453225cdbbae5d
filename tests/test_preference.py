"""Agreement of `alignbook.preference` with TRL's `DPOTrainer` loss on identical tiny inputs.

TRL (1.16 when these tests were written) is a test-only dependency. Its loss lives in
`DPOTrainer._compute_loss(model, inputs, return_outputs)`, which reads the per-token log-probs from a fused LM head
patched onto the model. The tests feed the same model and batch through `alignbook.core.token_logps` and our losses.
"""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")

from alignbook.core import sequence_logps, token_logps
from alignbook.data import data_path
from alignbook.preference import dpo_loss, ipo_loss

RTOL = 1e-5  # relative agreement required with TRL


def _gpt2_tokenizer():
    from transformers import GPT2TokenizerFast
    tokenizer = GPT2TokenizerFast(vocab=str(data_path("tokenizers/gpt2/vocab.json")),
                                  merges=str(data_path("tokenizers/gpt2/merges.txt")))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def make_trl_trainer(loss_type="sigmoid", beta=0.1, use_weighting=False, seed=0):
    "A TRL DPOTrainer over a 1-layer GPT-2 policy and a perturbed copy as reference."
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    tokenizer = _gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32)
    reference = GPT2LMHeadModel(config).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    dataset = Dataset.from_dict({"prompt": ["Hello"] * 2, "chosen": [" yes"] * 2, "rejected": [" no"] * 2})
    args = trl.DPOConfig(output_dir="/tmp/alignbook_trl_test", report_to=[], use_cpu=True, bf16=False, beta=beta,
                         loss_type=[loss_type], use_weighting=use_weighting, per_device_train_batch_size=2)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.model.eval()
    return trainer, policy, reference


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    "Forget the process-wide accelerate state a DPOTrainer leaves behind, so later tests can build their own."
    yield
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


def make_batch(vocab_size, n_pairs=3, length=9, seed=1):
    "Random stacked batch [chosen..., rejected...] with prompts of 3 tokens and right padding on some rows."
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (2 * n_pairs, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[n_pairs + 2, 4:] = 0  # a rejected response of a single token
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 3:] = 1
    completion_mask = completion_mask * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@torch.no_grad()
def our_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, mask = token_logps(logits, labels)
    return sequence_logps(logps, mask), mask.sum(-1)


def test_dpo_loss_matches_trl():
    trainer, policy, reference = make_trl_trainer("sigmoid", beta=0.1)
    batch = make_batch(policy.config.vocab_size)
    expected = trainer._compute_loss(trainer.model, batch, False).detach()
    logps, _ = our_logps(policy, batch)
    ref_logps, _ = our_logps(reference, batch)
    n = logps.shape[0] // 2
    ours = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=0.1)
    assert abs(expected.item() - 0.6931) > 1e-3, "policy and reference must differ for the comparison to mean anything"
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=0.0)


def test_dpo_metrics_match_trl():
    from alignbook.preference import preference_metrics
    trainer, policy, reference = make_trl_trainer("sigmoid", beta=0.2)
    batch = make_batch(policy.config.vocab_size, seed=3)
    trainer._compute_loss(trainer.model, batch, False)
    logps, _ = our_logps(policy, batch)
    ref_logps, _ = our_logps(reference, batch)
    n = logps.shape[0] // 2
    ours = preference_metrics(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta=0.2)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[key] == pytest.approx(trainer._metrics["eval"][key][-1], rel=RTOL, abs=1e-7), key


def test_ipo_loss_matches_trl():
    trainer, policy, reference = make_trl_trainer("ipo", beta=0.5)
    batch = make_batch(policy.config.vocab_size, seed=2)
    expected = trainer._compute_loss(trainer.model, batch, False).detach()
    logps, lengths = our_logps(policy, batch)
    ref_logps, _ = our_logps(reference, batch)
    n = logps.shape[0] // 2
    ours = ipo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], lengths[:n], lengths[n:], beta=0.5)
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=0.0)
