"""Fast checks of `alignbook.guidance`: the E2E and few-shot prompt paths on tiny models and a few rows.

The notebook `nbs/13_guidance.ipynb` contains the oracles of the losses. These tests cover the experiment code, so
that a regression in the data plumbing, the cached task-model scoring or the call accounting fails CI.
"""
import math
from dataclasses import replace

import pytest
import torch

from alignbook.data import load_e2e
from alignbook.guidance import (CompactVocab, CountingEvaluator, E2ETask, FewShotPromptTask, GuidanceConfig,
                                PromptPolicy, PromptScorer, gap_reward, reproduce, run_e2e, run_prompt_experiment,
                                sample_sequences, wmle_loss)
from alignbook.models import load_tokenizer, tiny_causal_lm
from alignbook.reproduce import ReproduceConfig

ROWS = [{"sentence": "a gripping , funny film .", "label": 1}, {"sentence": "dull", "label": 0},
        {"sentence": "the plot is thin but the cast is great fun .", "label": 1}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def e2e_task(tokenizer):
    return E2ETask(load_e2e("dev").select(range(30)), list(load_e2e("test").select(range(12))), tokenizer,
                   d_model=32, ffn_dim=64, head_hidden=16, max_new_tokens=6)


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    return tiny_causal_lm("llama", vocab_size=tokenizer.vocab_size, hidden_size=32, num_heads=2, seed=0).eval()


def test_compact_vocab_round_trip(tokenizer):
    vocab = CompactVocab(tokenizer, ["The Eagle is a pub near Burger King."])
    ids = vocab.encode("The Eagle is a pub.")
    assert ids[-1] == CompactVocab.eos_id
    assert max(ids) < vocab.size
    assert vocab.decode(ids) == "The Eagle is a pub."
    assert CompactVocab.unk_id in vocab.encode("Zanzibar")


def test_e2e_reference_scores_one(e2e_task):
    batch = e2e_task.sample(5, torch.Generator().manual_seed(1))
    scores = e2e_task.evaluate_batch(batch["labels"].clamp(min=0), batch)
    torch.testing.assert_close(scores, torch.ones(5))
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == 5
    assert (batch["attention_mask"].sum(1) > 0).all()


def test_e2e_run_counts_evaluator_calls(e2e_task):
    sizes = dict(warmup_steps=2, guidance_steps=2, refit_steps_count=1, policy_steps=4, refit_every=2, batch_size=4,
                 lists=2, curve_mrs=2, seeds=2)
    results = run_e2e(sizes, task=e2e_task, num_candidates=2)
    assert results["seeds"] == [0, 1]
    assert [r["evaluator_calls"] for r in results["wmle"]] == [(2 + 1) * 2 * 2] * 2
    assert [r["evaluator_calls"] for r in results["mle"]] == [0, 0]
    assert [step for step, _ in results["mle"][0]["curve"]] == [0, 2, 4]
    for record in results["mle"] + results["wmle"]:
        assert 0.0 <= record["test_rouge_l"] <= 1.0


def test_gap_reward_values():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    torch.testing.assert_close(gap_reward(logits, torch.tensor([1, 0])), torch.tensor([100.0, -90.0]))


def test_cached_scoring_matches_plain_forward(tiny_lm, tokenizer):
    scorer = PromptScorer(tiny_lm, tokenizer)
    sentences = scorer.encode([r["sentence"] for r in ROWS])
    state = scorer.prefix(sentences)
    for prompt in ([262, 3807, 373], [40], [1101, 257, 1332, 13, 632]):
        cached = scorer.verbalizer_logits(state, prompt)
        with torch.no_grad():
            plain = torch.stack([tiny_lm(torch.tensor([s + prompt])).logits[0, -1, scorer.verbalizer_ids]
                                 for s in sentences])
        torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)
    assert state["cache"].get_seq_length() == max(len(s) for s in sentences)
    assert scorer.calls == 3 * len(ROWS)


def test_masked_scoring_reads_mask_position(tokenizer):
    from copy import deepcopy
    from transformers import RobertaConfig, RobertaForMaskedLM
    tok = deepcopy(tokenizer)
    tok.add_special_tokens({"mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"})
    torch.manual_seed(0)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, pad_token_id=1,
                                             max_position_embeddings=64)).eval()
    scorer = PromptScorer(model, tok, kind="masked")
    sentences = scorer.encode([r["sentence"] for r in ROWS])
    logits = scorer.verbalizer_logits(scorer.prefix(sentences), [262, 3807])
    suffix = tok(".", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for row, sentence in zip(logits, sentences):
            ids = torch.tensor([[tok.cls_token_id] + sentence + [262, 3807, tok.mask_token_id] + suffix
                                + [tok.sep_token_id]])
            expected = model(ids).logits[0, 1 + len(sentence) + 2, scorer.verbalizer_ids]
            torch.testing.assert_close(row, expected, rtol=1e-4, atol=1e-4)


def test_scorer_rejects_bad_input(tiny_lm, tokenizer):
    with pytest.raises(ValueError, match="one token"):
        PromptScorer(tiny_lm, tokenizer, verbalizers=(" terrible", " very good"))
    with pytest.raises(ValueError, match="kind"):
        PromptScorer(tiny_lm, tokenizer, kind="seq2seq")
    scorer = PromptScorer(tiny_lm, tokenizer)
    with pytest.raises(ValueError, match="empty"):
        scorer.verbalizer_logits(scorer.prefix(scorer.encode(["fine"])), [])


def test_prompt_policy_starts_at_lm(tiny_lm, tokenizer):
    policy = PromptPolicy(tiny_lm, adaptor_hidden=8)
    ids = torch.tensor([[tokenizer.eos_token_id, 262, 3807]])
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, tiny_lm(ids).logits)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {"adaptor.0.weight", "adaptor.0.bias", "adaptor.2.weight", "adaptor.2.bias"}


def test_top_k_one_is_greedy(tiny_lm, tokenizer):
    policy = PromptPolicy(tiny_lm, adaptor_hidden=8)
    tokens = sample_sequences(policy, 2, 3, tokenizer.eos_token_id, tokenizer.vocab_size,
                              torch.Generator().manual_seed(0), top_k=1)
    assert torch.equal(tokens[0], tokens[1])
    with torch.no_grad():
        first = policy(torch.tensor([[tokenizer.eos_token_id]])).logits[0, -1].argmax()
    assert tokens[0, 0] == first
    with pytest.raises(ValueError, match="top_k"):
        sample_sequences(policy, 1, 1, tokenizer.eos_token_id, tokenizer.vocab_size, top_k=0)


def test_prompt_experiment_equal_calls(tiny_lm, tokenizer):
    task = FewShotPromptTask(PromptScorer(tiny_lm, tokenizer), ROWS, tiny_lm, prompt_length=2, adaptor_hidden=8,
                             guidance_hidden=16, guidance_layers=1)
    cfg = replace(GuidanceConfig.prompt_real(), guidance_steps=2, refit_steps=1, policy_steps=4, refit_every=2,
                  samples_per_step=2, pool_size=4, lists_per_step=3, num_candidates=3, top_k=10)
    results = run_prompt_experiment(task, cfg, ROWS, ROWS, candidates=2)
    guided, sequence = results["guidance"][0], results["sequence"][0]
    assert guided["evaluator_calls"] == sequence["evaluator_calls"] == (2 + 1) * 4
    assert guided["task_model_calls"] == guided["evaluator_calls"] * len(ROWS)
    assert sequence["policy_steps"] == guided["evaluator_calls"] // cfg.samples_per_step
    assert len(guided["candidates"]) == 2
    assert 0.0 <= results["hand_written"]["test_accuracy"] <= 1.0


def test_config_and_loss_input_errors():
    with pytest.raises(ValueError, match="aggregation"):
        GuidanceConfig(aggregation="median")
    with pytest.raises(ValueError, match="sequence_reward_norm"):
        GuidanceConfig(sequence_reward_norm="rank")
    with pytest.raises(ValueError, match="num_candidates"):
        GuidanceConfig(num_candidates=1)
    with pytest.raises(ValueError, match="rewards"):
        wmle_loss(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        CountingEvaluator(lambda c, x: [float("inf")])([[1]])


def test_reproduce_rejects_unknown_part(tmp_path):
    config = ReproduceConfig("guidance", "small", out_dir=tmp_path, options={"parts": "toy_a,summaries"})
    with pytest.raises(ValueError, match="summaries"):
        reproduce(config)


def test_reproduce_rejects_misspelled_option(tmp_path):
    config = ReproduceConfig("guidance", "small", out_dir=tmp_path, options={"parts": "toy_a", "polciy_steps": 5})
    with pytest.raises(ValueError, match="polciy_steps"):
        reproduce(config)


def test_reproduce_toy_b_alone_has_summary(tmp_path):
    options = {"parts": "toy_b", "toy_b_warmup_steps": 2, "toy_b_guidance_steps": 1, "toy_b_refit_steps_count": 1,
               "toy_b_policy_steps": 2, "toy_b_refit_every": 1, "toy_b_eval_size": 4, "toy_b_lists": 2,
               "toy_b_batch_size": 4}
    metrics = reproduce(ReproduceConfig("guidance", "small", out_dir=tmp_path, options=options, progress=False))
    assert metrics["summary"]["metric"] == "clean ROUGE-L (Toy B)"
    assert metrics["summary"]["method"] == metrics["toy_b/clean_rouge_l/wmle"]


def test_heatmap_matches_loop():
    from alignbook.guidance import HiddenValueTask, guidance_by_token_position
    task = HiddenValueTask(vocab_size=6, length=3)
    guidance = task.guidance(hidden_size=16, head_hidden=8).eval()
    tokens = torch.randint(0, 6, (20, 3), generator=torch.Generator().manual_seed(0))
    heat = guidance_by_token_position(guidance, tokens, 6)
    with torch.no_grad():
        rewards = guidance(tokens)
    for token in range(6):
        for t in range(3):
            hits = tokens[:, t] == token
            if hits.any():
                torch.testing.assert_close(heat[token, t], rewards[hits, t].mean())
            else:
                assert torch.isnan(heat[token, t])


def test_paper_prompt_path_with_local_stand_ins(tmp_path, tokenizer):
    "The paper preset's prompt path (masked task model, separate policy tokenizer) on tiny local stand-ins."
    import json
    from copy import deepcopy
    from transformers import GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM
    masked_tok = deepcopy(tokenizer)
    masked_tok.add_special_tokens({"mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"})
    torch.manual_seed(0)
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(masked_tok), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, pad_token_id=1,
                                     max_position_embeddings=160)).save_pretrained(tmp_path / "task")
    masked_tok.save_pretrained(tmp_path / "task")
    GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2,
                               n_positions=32)).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    models = {"prompt_task": str(tmp_path / "task"), "prompt_policy": str(tmp_path / "policy"),
              "prompt_guidance": str(tmp_path / "policy")}
    options = {"parts": "prompt", "paper_models": models, "prompt_guidance_steps": 1, "prompt_refit_steps": 1,
               "prompt_policy_steps": 2, "prompt_refit_every": 1, "prompt_samples_per_step": 2,
               "prompt_lists_per_step": 2, "prompt_test_limit": 3, "prompt_split_seeds": [21]}
    metrics = reproduce(ReproduceConfig("guidance", "paper", out_dir=tmp_path / "runs", options=options,
                                        progress=False))
    assert [k for k in metrics if k.startswith("prompt/split_")] == ["prompt/split_21"]
    first = metrics["prompt/split_21"]
    assert first["guidance"][0]["evaluator_calls"] == first["sequence"][0]["evaluator_calls"] == 2 * 16
    assert metrics["prompt/test_sentences"] == 3
    json.dumps(metrics, default=str)


def test_toy_b_runs_through_compare_wmle():
    from alignbook.guidance import run_toy_b
    results = run_toy_b(warmup_steps=3, guidance_steps=2, refit_steps_count=1, policy_steps=4, refit_every=2,
                        batch_size=8, lists=4, eval_size=10)
    assert results["wmle"]["calls"] == (2 + 1) * 4 * 3  # (fit + refit steps) x lists x K
    assert [step for step, _ in results["mle"]["curve"]] == [0, 2, 4]
    assert results["mle"]["curve"][0] == results["wmle"]["curve"][0]  # both start from the same warm-up
    assert 0.0 <= results["wmle"]["auroc_corrupted"] <= 1.0
    assert len(results["wmle"]["weights_clean"]) > 0
