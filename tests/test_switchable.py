"""Oracle tests for alignbook.switchable.

The gated BERT and BART wrappers are compared with the unmodified Hugging Face models, and the skip path with the
masked form. Further tests cover token skipping, the FLOPs model against FlopCounterMode, decision tables, the
policy's log-probabilities, the constrained updates, the baselines, and tiny runs of every preset.
"""
import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BartConfig, BartForConditionalGeneration, BertConfig, BertModel, ElectraConfig, ElectraModel, MarianConfig,
    MarianMTModel, MBartConfig, MBartForConditionalGeneration, PegasusConfig, PegasusForConditionalGeneration,
    RobertaConfig, RobertaModel, RobertaPreLayerNormConfig, RobertaPreLayerNormModel, T5Config,
    T5ForConditionalGeneration,
)

from alignbook.reproduce import ReproduceConfig
from alignbook.switchable import (
    AgentObjective, SkipAgent, SwitchableClassifier, SwitchableConfig, SwitchableSeq2Seq, all_patterns,
    decision_table, dynamic_barrier_direction, early_exit_curve, flops_fraction, gather_kept_tokens,
    kept_token_order, load_text_classification, model_flops, pattern_index, reproduce, rouge_l, run_e2e, skip_forward,
    plot_tradeoff, score_function_surrogate, skip_predict, static_baselines, static_envelope, table_outcomes,
    train_agent, train_backbone,
)


def _bert(layers=4, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"  # torch 2.13's FlopCounterMode records nothing for the fused CPU SDPA kernel
    return SwitchableClassifier(BertModel(config, add_pooling_layer=False), num_labels=3).eval()


def _bart(seed=0):
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=30, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=3, decoder_start_token_id=1,
                        forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    config._attn_implementation = "eager"
    return BartForConditionalGeneration(config).eval()


def _t5(seed=0, gated=False):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=30, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu" if gated else "relu", pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=2)
    config._attn_implementation = "eager"
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def bert_inputs():
    ids = torch.randint(3, 40, (6, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def bart_inputs():
    src = torch.randint(4, 30, (4, 7), generator=torch.Generator().manual_seed(0))
    src[:, 0] = 1
    src_mask = torch.ones_like(src)
    src_mask[1, 5:] = 0
    tgt = torch.randint(4, 30, (4, 5), generator=torch.Generator().manual_seed(1))
    tgt[:, 0] = 1
    return src, src_mask, tgt


def test_classifier_all_gates_on_equals_hf(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    reference = model.head(model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
    torch.testing.assert_close(model(ids, mask, torch.ones(6, 6)), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(skip_forward(model, ids, mask, torch.ones(6, 6)), reference, atol=1e-5, rtol=0)


def test_classifier_gate_off_equals_removed_ffn(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    removed = copy.deepcopy(model)

    class PassThrough(nn.Module):  # BertOutput(intermediate, h) with the FFN block removed returns h
        def forward(self, intermediate, h):
            return h
    removed.layers[3].output = PassThrough()
    decisions = torch.ones(6, 6)
    decisions[:, 5] = 0                                                                  # layer 4 FFN off
    torch.testing.assert_close(model(ids, mask, decisions), removed(ids, mask), atol=1e-6, rtol=0)


def test_token_skip_masked_equals_gathered(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    keep = torch.ones(6, 10)
    keep[0, 2:6] = 0
    keep[3, 9] = 0
    keep[5, 1:] = 0
    decisions = torch.randint(0, 2, (6, 6), generator=torch.Generator().manual_seed(1)).float()
    masked = model(ids, mask, decisions, keep)
    torch.testing.assert_close(skip_forward(model, ids, mask, decisions, keep), masked, atol=1e-5, rtol=0)
    h1, _ = model.first_layer(ids, mask)
    noise = torch.randn(h1.shape, generator=torch.Generator().manual_seed(2)) * (1 - keep)[..., None] * 5
    torch.testing.assert_close(model.forward_rest(h1 + noise, mask, decisions, keep), masked, atol=1e-5, rtol=0)


def test_gather_kept_tokens_order_and_mask():
    h = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    keep = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    gathered, kept_mask = gather_kept_tokens(h, mask, keep)
    assert gathered.shape == (2, 3, 1)
    assert gathered[0, :, 0].tolist() == [0.0, 2.0, 3.0]
    assert gathered[1, :2, 0].tolist() == [5.0, 6.0]
    assert kept_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_flops_match_flop_counter_with_tokens():
    model = _bert()
    ids = torch.randint(3, 40, (1, 12), generator=torch.Generator().manual_seed(3))
    keep = torch.ones(1, 12)
    keep[0, 4:9] = 0
    for decisions in (torch.ones(1, 6), torch.tensor([[0.0, 1, 1, 0, 1, 1]]), torch.zeros(1, 6)):
        with FlopCounterMode(display=False) as counter:
            skip_forward(model, ids, torch.ones_like(ids), decisions, keep)
        analytic = model_flops(model, torch.tensor([12]), decisions, torch.tensor([7])).item()
        assert abs(counter.get_total_flops() - analytic) / analytic < 0.05


def test_flops_monotone_and_normalised():
    model = _bert()
    lengths = torch.tensor([10])
    full = model_flops(model, lengths)
    assert flops_fraction(model, lengths, torch.ones(1, 6)).item() == 1.0
    for j in range(6):
        decisions = torch.ones(1, 6)
        decisions[0, j] = 0
        assert model_flops(model, lengths, decisions) < full
    assert model_flops(model, lengths, torch.ones(1, 6), torch.tensor([9])) < full


def test_decision_table_matches_skip_path(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    table = decision_table(model, ids, mask, labels, batch_size=4)
    patterns = all_patterns(6)
    assert pattern_index(patterns).tolist() == list(range(64))
    for p in (0, 9, 33, 63):
        decisions = patterns[p].expand(6, -1)
        torch.testing.assert_close(table["logits"][:, p], skip_forward(model, ids, mask, decisions), atol=1e-5, rtol=0)
    assert torch.equal(table["delta_table"][:, -1], torch.zeros(6))
    outcome = table_outcomes(table, torch.ones(6, 6))
    assert outcome["flops"] == pytest.approx(1.0)


def test_static_baselines_and_early_exit_limits(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    table = decision_table(model, ids, mask, torch.tensor([0, 1, 2, 0, 1, 2]))
    static = static_baselines(table, table)
    assert [p["pattern"] for p in static["layer_drop"]][0] == 63
    assert static["layer_drop"][-1]["pattern"] == 0
    assert len(static["greedy"]) == 7
    curve = early_exit_curve(model, table, thresholds=(0.0, 1.01))
    assert curve[0]["flops"] == pytest.approx(float(table["cost_table"][:, 0].mean()))
    assert curve[1]["accuracy"] == pytest.approx(float(table["correct"][:, -1].mean()))
    points = [{"flops": 0.25, "accuracy": 0.6}, {"flops": 1.0, "accuracy": 0.9}, {"flops": 0.5, "accuracy": 0.65}]
    assert static_envelope(points, 0.625) == pytest.approx(0.75)                             # on the 0.25-1.0 chord


def test_token_policy_forces_special_and_padding(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    agent = SkipAgent(32, 6, SwitchableConfig(skip_tokens=True))
    with torch.no_grad():
        agent.token_head.weight.normal_(generator=torch.Generator().manual_seed(4))
    h1, _ = model.first_layer(ids, mask)
    keep, log_prob = agent.sample_tokens(h1, mask, generator=torch.Generator().manual_seed(0))
    assert torch.all(keep[:, 0] == 1)
    assert torch.all(keep[2, 7:] == 0)
    p = 0.8 * torch.sigmoid(agent.token_logits(h1, mask)) + 0.2 * (1 - torch.sigmoid(agent.token_logits(h1, mask)))
    free = mask.bool().clone()
    free[:, 0] = False
    expected = torch.stack([torch.distributions.Bernoulli(probs=p[b][free[b]]).log_prob(keep[b][free[b]]).sum()
                            for b in range(6)])
    torch.testing.assert_close(log_prob, expected, atol=1e-5, rtol=0)


def test_barrier_guarantee_and_release():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        g_cost, g_quality = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
        value = float(torch.randn(1, generator=g))
        v, lam = dynamic_barrier_direction(g_cost, g_quality, value)
        assert lam >= 0
        assert torch.dot(g_quality, v) >= value - 1e-8
    _, violated = dynamic_barrier_direction(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.3)
    _, met = dynamic_barrier_direction(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), -0.3)
    assert violated > 0
    assert met == 0.0


def test_lagrangian_multiplier_grows_then_stays():
    objective = AgentObjective(_bert(), SwitchableConfig(method="lagrangian", dual_lr=0.5))
    objective.constraint_ema = 0.2
    assert [objective._multiplier(None, None, None) for _ in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    objective.constraint_ema = -1.0
    assert objective._multiplier(None, None, None) == 0.0


def test_policy_on_table_lowers_cost(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    table = decision_table(model, ids.repeat(8, 1), mask.repeat(8, 1), torch.tensor([0, 1, 2, 0, 1, 2]).repeat(8))
    cfg = SwitchableConfig(eps=10.0, lr=3e-2, steps=30, batch_size=32)  # a loose constraint, so cost dominates
    agent, history = train_agent(model, cfg, table=table)
    assert history[-1]["cost/mean"] < history[0]["cost/mean"]
    assert sum(p.requires_grad for p in model.parameters()) == 0
    _, accuracy_history = train_agent(model, SwitchableConfig(quality="accuracy", eps=1.0, lr=3e-2, steps=30, batch_size=32),
                                      table=table)
    assert accuracy_history[-1]["cost/mean"] < accuracy_history[0]["cost/mean"]
    with pytest.raises(NotImplementedError, match="decision table"):
        train_agent(model, SwitchableConfig(quality="accuracy", steps=1, batch_size=4),
                    dataset={"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(6, dtype=torch.long)})


def test_backbone_early_stopping_keeps_best(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    train = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    validation = {"input_ids": ids.flip(0), "attention_mask": mask.flip(0), "labels": labels}  # other label per row
    history = train_backbone(model, steps=40, batch_size=6, lr=3e-2, dataset=train, validation=validation,
                             eval_every=5)
    losses = [r["loss/validation"] for r in history if "loss/validation" in r]
    assert len(losses) == 8
    best = min(range(8), key=lambda i: losses[i])
    assert history[-1]["best_step"] == 5 * (best + 1)
    model.eval()
    with torch.no_grad():
        h1, _ = model.first_layer(ids.flip(0), mask.flip(0))
        restored = float(model.instance_losses(h1, validation).mean())
    assert restored == pytest.approx(losses[best], abs=1e-5)
    assert losses[-1] > losses[best]                                                    # memorising the swap hurts


def test_budget_form_activates_barrier(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    table = decision_table(model, ids.repeat(8, 1), mask.repeat(8, 1), torch.tensor([0, 1, 2, 0, 1, 2]).repeat(8))
    cfg = SwitchableConfig(constraint="budget", budget=0.3, lr=3e-2, steps=30, batch_size=32)
    _, history = train_agent(model, cfg, table=table)
    assert history[0]["constraint/ema"] > 0                                              # cost ~0.9 > budget 0.3
    assert history[0]["lambda"] > 0
    assert history[-1]["cost/mean"] < history[0]["cost/mean"]


def test_budget_below_sampling_floor(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    table = decision_table(model, ids.repeat(8, 1), mask.repeat(8, 1), torch.tensor([0, 1, 2, 0, 1, 2]).repeat(8))
    layer1_only = float(table["cost_table"][:, 0].mean())
    floor = layer1_only + 0.2 * (1 - layer1_only)                                       # every candidate kept w.p. 0.2
    budget = (layer1_only + floor) / 2
    base = SwitchableConfig(constraint="budget", budget=budget, lr=3e-2, steps=150, batch_size=32)
    _, greedy = train_agent(model, base, table=table)
    assert greedy[-1]["cost/greedy"] <= budget
    assert greedy[-1]["lambda"] < 1e3
    _, sampled = train_agent(model, replace(base, constraint_on="sampled"), table=table)
    assert sampled[-1]["cost/mean"] > budget                                            # unreachable when sampled
    assert sampled[-1]["constraint/ema"] > 0


def test_skip_predict_matches_table(bert_inputs):
    ids, mask = bert_inputs
    model = _bert()
    table = decision_table(model, ids, mask, torch.zeros(6, dtype=torch.long))
    agent = SkipAgent(32, 6, SwitchableConfig())
    with torch.no_grad():
        agent.net[2].weight.normal_(generator=torch.Generator().manual_seed(5))
    logits, decisions = skip_predict(model, agent, ids, mask)
    torch.testing.assert_close(logits, table["logits"][torch.arange(6), pattern_index(decisions)], atol=1e-5, rtol=0)


def test_bart_all_on_equals_hf_and_generate(bart_inputs):
    src, src_mask, tgt = bart_inputs
    bart = _bart()
    model = SwitchableSeq2Seq(bart)
    reference = bart(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
    torch.testing.assert_close(model(src, src_mask, tgt, torch.ones(4, 8)), reference, atol=1e-5, rtol=0)
    hf = bart.generate(input_ids=src, attention_mask=src_mask, max_new_tokens=5, do_sample=False, num_beams=1)
    assert torch.equal(model.generate(src, src_mask, max_new_tokens=5)[:, : hf.shape[1]], hf)


def test_bart_skip_path_and_flops(bart_inputs):
    src, src_mask, tgt = bart_inputs
    model = SwitchableSeq2Seq(_bart())
    decisions = torch.randint(0, 2, (4, 8), generator=torch.Generator().manual_seed(6)).float()
    keep = torch.ones(4, 7)
    keep[0, 3:5] = 0
    torch.testing.assert_close(model.skip_logits(src, src_mask, tgt, decisions, keep),
                               model(src, src_mask, tgt, decisions, keep), atol=1e-5, rtol=0)
    row = torch.tensor([[1.0, 1, 0, 1, 0, 1, 1, 0]])
    with FlopCounterMode(display=False) as counter:
        model.skip_logits(src[:1], torch.ones_like(src[:1]), tgt[:1], row, keep[:1])
    analytic = model.flops(torch.tensor([7]), torch.tensor([5]), row, torch.tensor([5])).item()
    assert abs(counter.get_total_flops() - analytic) / analytic < 0.05


@pytest.mark.parametrize("gated", [False, True])
def test_t5_all_on_equals_hf_and_generate(bart_inputs, gated):
    src, src_mask, tgt = bart_inputs
    tgt = tgt.clone()
    tgt[:, 0] = 2                                                                       # decoder start token
    t5 = _t5(gated=gated)
    model = SwitchableSeq2Seq(t5)
    assert model.arch == "t5"
    assert model.num_decisions == 8
    reference = t5(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
    torch.testing.assert_close(model(src, src_mask, tgt), reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(src, src_mask, tgt, torch.ones(4, 8)), reference, atol=1e-6, rtol=0)
    hf = t5.generate(input_ids=src, attention_mask=src_mask, max_new_tokens=5, do_sample=False, num_beams=1,
                     min_length=0)
    assert torch.equal(model.generate(src, src_mask, max_new_tokens=5)[:, : hf.shape[1]], hf)


@pytest.mark.parametrize("sublayer, block, index", [(0, 1, 0), (-1, 2, 3), (-1, 0, 5), (0, 1, 6)])
def test_t5_gate_off_equals_removed_sublayer(bart_inputs, sublayer, block, index):
    src, src_mask, tgt = bart_inputs
    t5 = _t5()
    removed = copy.deepcopy(t5)
    # decision index -> encoder blocks 2..3 [att, ffn], then decoder blocks 1..2 [att, ffn]. The attention of
    # block 1, which owns the relative-position bias in Hugging Face's stack, is not removed here: the wrapper keeps
    # the bias when that attention is skipped.
    stack = removed.encoder if index < 4 else removed.decoder

    class Identity(nn.Module):
        def forward(self, h, attention_mask=None, position_bias=None, **kwargs):
            return h if sublayer == -1 else (h, position_bias, None)

    stack.block[block].layer[sublayer] = Identity()
    decisions = torch.ones(4, 8)
    decisions[:, index] = 0
    expected = removed(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt).logits
    torch.testing.assert_close(SwitchableSeq2Seq(t5)(src, src_mask, tgt, decisions), expected, atol=1e-5, rtol=0)


def test_t5_skip_path_tokens_and_flops(bart_inputs):
    src, src_mask, tgt = bart_inputs
    for gated in (False, True):
        model = SwitchableSeq2Seq(_t5(gated=gated))
        decisions = torch.randint(0, 2, (4, 8), generator=torch.Generator().manual_seed(6)).float()
        keep = torch.ones(4, 7)
        keep[0, 3:5] = 0
        keep[2, 1] = 0
        torch.testing.assert_close(model.skip_logits(src, src_mask, tgt, decisions, keep),
                                   model(src, src_mask, tgt, decisions, keep), atol=1e-5, rtol=0)
        for row in (torch.ones(1, 8), torch.tensor([[1.0, 1, 0, 1, 0, 1, 1, 0]]), torch.zeros(1, 8)):
            with FlopCounterMode(display=False) as counter:
                model.skip_logits(src[:1], torch.ones_like(src[:1]), tgt[:1], row, keep[:1])
            analytic = model.flops(torch.tensor([7]), torch.tensor([5]), row, torch.tensor([5])).item()
            assert abs(counter.get_total_flops() - analytic) / analytic < 0.05


def test_t5_gather_needs_original_positions(bart_inputs):
    src, src_mask, _ = bart_inputs
    model = SwitchableSeq2Seq(_t5())
    keep = torch.tensor([[1.0, 1, 0, 0, 1, 1, 1]])
    h1, _ = model.first_layer(src[:1], src_mask[:1])
    masked = model.encode_rest(h1, keep.long(), [True] * 4)                             # (1, 7, D) key mask
    gathered, kept_mask = gather_kept_tokens(h1, src_mask[:1], keep)
    positions = kept_token_order(src_mask[:1], keep)
    assert positions.tolist() == [[0, 1, 4, 5, 6]]
    right = model.encode_rest(gathered, kept_mask, [True] * 4, positions=positions)
    torch.testing.assert_close(right, masked[:, [0, 1, 4, 5, 6]], atol=1e-5, rtol=0)
    wrong = model.encode_rest(gathered, kept_mask, [True] * 4)
    assert (wrong - right).abs().max() > 1e-3


def test_rouge_l_values():
    assert rouge_l("a b c".split(), ["a b c".split()]) == pytest.approx(1.0)
    assert rouge_l("a x c".split(), ["a b c d".split()]) == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert rouge_l([], ["a".split()]) == 0.0


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    cases = [("the eagle is a coffee shop near the river", ["the eagle coffee shop is near the river",
                                                              "a coffee shop called the eagle"]),
             ("alimentum serves french food", ["the alimentum is a french restaurant"]),
             ("no overlap here", ["completely different words"])]
    for candidate, references in cases:
        expected = scorer.score_multi(references, candidate)["rougeL"].fmeasure
        assert rouge_l(candidate.split(), [r.split() for r in references]) == pytest.approx(expected)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="budget"):
        SwitchableConfig(budget=1.5)
    with pytest.raises(ValueError, match="budget"):
        SwitchableConfig(budget=0.0)
    with pytest.raises(ValueError, match="not supported"):
        SwitchableClassifier(nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="not supported"):
        SwitchableSeq2Seq(nn.Linear(2, 2))
    one_block = _t5()
    one_block.encoder.block = one_block.encoder.block[:1]
    with pytest.raises(ValueError, match="at least 2 encoder layers"):
        SwitchableSeq2Seq(one_block)
    with pytest.raises(ValueError, match="decisions has shape"):
        SwitchableSeq2Seq(_t5())(torch.ones(2, 4).long(), torch.ones(2, 4), torch.zeros(2, 3).long(), torch.ones(2, 7))
    model = _bert()
    ids = torch.randint(3, 40, (2, 5))
    with pytest.raises(ValueError, match="decisions has shape"):
        model(ids, torch.ones_like(ids), torch.ones(2, 5))
    with pytest.raises(ValueError, match="position 0"):
        skip_forward(model, ids, torch.ones_like(ids), torch.ones(2, 6), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="hard 0/1"):
        skip_forward(model, ids, torch.ones_like(ids), torch.full((2, 6), 0.5))
    with pytest.raises(ValueError, match="at most 12"):
        decision_table(_bert(layers=8), ids, torch.ones_like(ids), torch.zeros(2, dtype=torch.long))


def test_text_classification_splits_are_disjoint():
    data = load_text_classification("mr", n_policy=300, n_test=300)
    assert data["num_labels"] == 2
    sizes = {name: len(data[name]["labels"]) for name in ("backbone", "policy", "test")}
    assert sizes["policy"] == 300
    assert sizes["test"] == 300
    assert sizes["backbone"] > 1000
    rows = {name: {tuple(r.tolist()) for r in data[name]["input_ids"]} for name in ("backbone", "test")}
    assert len(rows["backbone"] & rows["test"]) < 5                                      # only identical encodings
    assert torch.all(data["test"]["input_ids"][:, 0] == 1)                               # [CLS] first


def test_run_e2e_tiny_config():
    results = run_e2e(backbone_steps=3, agent_steps=2, n_test=4, batch_size=8, max_new_tokens=6, latency_examples=1,
                      n_validation=8)
    assert results["full"]["flops"] == pytest.approx(1.0)
    assert 0 < results["policy"]["flops"] <= 1
    assert 0 <= results["policy"]["rouge_l"] <= 1
    assert results["latency"]["full"] > 0


def test_reproduce_real_preset_runs(tmp_path: Path):
    real = reproduce(ReproduceConfig("switchable", "real", tmp_path, progress=False,
                                     options={"backbone_steps": 2, "agent_steps": 2, "n_test": 3, "n_validation": 8}))
    assert 0 <= real["summary"]["method"] <= 1


def _save_tiny_checkpoint(folder: Path, arch: str) -> None:
    "Save a tiny BART or T5 with the GPT-2 tokenizer of the data directory, standing in for a checkpoint name."
    from alignbook.models import load_tokenizer
    tokenizer = load_tokenizer("gpt2")
    if arch == "bart":
        config = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=2, decoder_layers=1,
                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                            decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            decoder_start_token_id=tokenizer.bos_token_id, forced_eos_token_id=None)
        BartForConditionalGeneration(config).save_pretrained(folder)
    else:
        config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1,
                          num_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          decoder_start_token_id=tokenizer.pad_token_id)
        T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_reproduce_paper_preset_loads_checkpoint(tmp_path: Path, arch):
    folder = tmp_path / f"tiny-{arch}"
    _save_tiny_checkpoint(folder, arch)
    paper = reproduce(ReproduceConfig("switchable", "paper", tmp_path, progress=False,
                                      options={"model_name": str(folder), "backbone_steps": 1, "agent_steps": 2,
                                               "n_test": 2, "n_validation": 4}))
    assert paper["model_name"] == str(folder)
    assert paper["full"]["flops"] == pytest.approx(1.0)
    assert 0 < paper["policy"]["flops"] <= 1


_ENCODER_SIZES = dict(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                      max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_SEQ2SEQ_SIZES = dict(vocab_size=30, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                      pad_token_id=0, decoder_start_token_id=1)


@pytest.mark.parametrize("backbone", [
    lambda: RobertaModel(RobertaConfig(**_ENCODER_SIZES, pad_token_id=1), add_pooling_layer=False),
    lambda: ElectraModel(ElectraConfig(**_ENCODER_SIZES, embedding_size=32)),
])
def test_roberta_electra_all_on_equal_hf(backbone):
    torch.manual_seed(0)
    hf = backbone().eval()
    model = SwitchableClassifier(hf, num_labels=2).eval()
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    reference = model.head(hf(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])
    torch.testing.assert_close(model(ids, mask, torch.ones(2, 4)), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("build, name", [
    (lambda: RobertaPreLayerNormModel(RobertaPreLayerNormConfig(**_ENCODER_SIZES)), "roberta-prelayernorm"),
    (lambda: ElectraModel(ElectraConfig(**_ENCODER_SIZES, embedding_size=16)), "embedding_size 16"),
])
def test_unsupported_encoders_raise(build, name):
    with pytest.raises(ValueError, match=name):
        SwitchableClassifier(build(), num_labels=2)


@pytest.mark.parametrize("build, name", [
    (lambda: MBartForConditionalGeneration(MBartConfig(**_SEQ2SEQ_SIZES)), "mbart"),
    (lambda: PegasusForConditionalGeneration(PegasusConfig(**_SEQ2SEQ_SIZES)), "pegasus"),
    (lambda: MarianMTModel(MarianConfig(**_SEQ2SEQ_SIZES)), "marian"),
])
def test_unsupported_seq2seq_raise(build, name):
    with pytest.raises(ValueError, match=f"model_type '{name}'.*'bart', 't5'"):
        SwitchableSeq2Seq(build())


@pytest.mark.parametrize("n_policy, n_test", [(0, 300), (300, -5), (300, 0), (300, 2.5)])
def test_text_split_sizes_must_be_positive(n_policy, n_test):
    with pytest.raises(ValueError, match="n_policy" if n_policy == 0 else "n_test"):
        load_text_classification("agnews", n_policy=n_policy, n_test=n_test)


def test_text_split_larger_than_pool_raises():
    with pytest.raises(ValueError, match="fewer than 100"):
        load_text_classification("agnews", n_policy=5000, n_test=5000)


@pytest.mark.parametrize("value", [0.5, 2.0, float("nan"), -1.0])
def test_soft_gates_raise(bert_inputs, bart_inputs, value):
    ids, mask = bert_inputs
    model = _bert()
    soft = torch.ones(6, 6)
    soft[1, 2] = value
    with pytest.raises(ValueError, match="decisions must contain only hard"):
        model(ids, mask, soft)
    keep = torch.ones(6, 10)
    keep[1, 3] = value
    with pytest.raises(ValueError, match="token_keep must contain only hard"):
        model(ids, mask, torch.ones(6, 6), keep)
    src, src_mask, tgt = bart_inputs
    s2s = SwitchableSeq2Seq(_bart())
    soft = torch.ones(4, s2s.num_decisions)
    soft[0, 1] = value
    with pytest.raises(ValueError, match="decisions must contain only hard"):
        s2s(src, src_mask, tgt, soft)
    with pytest.raises(ValueError, match="decisions must contain only hard"):
        s2s.generate(src, src_mask, soft, max_new_tokens=2)
    table = {"labels": torch.zeros(6), "correct": torch.zeros(6, 64), "cost_table": torch.zeros(6, 64)}
    with pytest.raises(ValueError, match="decisions must contain only hard"):
        table_outcomes(table, soft[:1].expand(6, -1)[:, :6].clone())


def test_gate_dtypes_converted(bert_inputs, bart_inputs):
    ids, mask = bert_inputs
    model = _bert()
    decisions = torch.randint(0, 2, (6, 6), generator=torch.Generator().manual_seed(3)).float()
    expected = model(ids, mask, decisions)
    for dtype in (torch.bool, torch.float64, torch.long):
        torch.testing.assert_close(model(ids, mask, decisions.to(dtype)), expected)
    src, src_mask, tgt = bart_inputs
    s2s = SwitchableSeq2Seq(_bart())
    gates = torch.ones(4, s2s.num_decisions)
    torch.testing.assert_close(s2s(src, src_mask, tgt, gates.bool()), s2s(src, src_mask, tgt, gates))


def test_generate_negative_length_raises(bart_inputs):
    src, src_mask, _ = bart_inputs
    with pytest.raises(ValueError, match="max_new_tokens"):
        SwitchableSeq2Seq(_bart()).generate(src, src_mask, max_new_tokens=-1)


@pytest.mark.parametrize("field, value", [
    ("eps", -0.1), ("eps", float("nan")), ("lr", 0.0), ("lr", float("nan")), ("ema", 1.5), ("ema", -0.1),
    ("barrier_delta", 0.0), ("barrier_alpha", -1.0), ("dual_lr", -0.5), ("penalty_mu", -1.0), ("agent_hidden", 0),
    ("steps", 2.5), ("entropy_coef", float("nan")), ("init_keep_bias", float("nan")), ("budget", "0.5"),
])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SwitchableConfig(**{field: value})


@pytest.mark.parametrize("options, message", [
    ({"agent_stepz": 1}, "agent_stepz"), ({"budget": 2}, "budget"), ({"": 5}, "Unknown option"),
    ({"agent_steps": 2.7}, "agent_steps"), ({"agent_steps": True}, "agent_steps"),
    ({"agent_steps": "abc"}, "agent_steps"), ({"toy_backbone_steps": 0}, "toy_backbone_steps"),
    ({"task": "imdb"}, "task"),
])
def test_reproduce_rejects_bad_option_first(tmp_path: Path, monkeypatch, options, message):
    import alignbook.switchable as switchable

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the options were checked")
    monkeypatch.setattr(switchable, "run_toy", no_training)
    with pytest.raises(ValueError, match=message):
        reproduce(ReproduceConfig("switchable", "small", tmp_path, progress=False, options=options))


def test_reproduce_real_rejects_unknown_option(tmp_path: Path, monkeypatch):
    import alignbook.switchable as switchable
    monkeypatch.setattr(switchable, "run_e2e", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match="valid options are"):
        reproduce(ReproduceConfig("switchable", "real", tmp_path, progress=False, options={"task": "agnews"}))


@pytest.mark.parametrize("lengths, decisions, kept, message", [
    (torch.tensor([float("nan"), 4.0]), None, None, "lengths must be finite"),
    (torch.tensor([-3, 4]), None, None, "lengths must be finite"),
    (torch.tensor([5, 4]), None, torch.tensor([9, 4]), "exceed"),
    (torch.tensor([5, 4]), torch.ones(6), None, "decisions has shape"),
    (torch.tensor([5, 4]), torch.ones(2, 5), None, "decisions has shape"),
    (torch.tensor([5, 4]), torch.full((2, 6), float("nan")), None, r"\[0, 1\]"),
])
def test_flops_inputs_checked(lengths, decisions, kept, message):
    with pytest.raises(ValueError, match=message):
        model_flops(_bert(), lengths, decisions, kept)


def test_flops_fraction_kept_above_length_raises():
    with pytest.raises(ValueError, match="exceed"):
        flops_fraction(_bert(), torch.tensor([5]), torch.ones(1, 6), torch.tensor([40]))
    s2s = SwitchableSeq2Seq(_bart())
    with pytest.raises(ValueError, match="tgt_lengths"):
        s2s.flops(torch.tensor([5]), torch.tensor([-1]))


def test_non_finite_training_inputs_raise():
    agent = SkipAgent(32, 6, SwitchableConfig(skip_tokens=True))
    h1, mask = torch.full((2, 5, 32), float("nan")), torch.ones(2, 5)
    with pytest.raises(ValueError, match="h1 contains non-finite"):
        agent.sample(h1, mask)
    with pytest.raises(ValueError, match="h1 contains non-finite"):
        agent.sample_tokens(h1, mask)
    log_prob = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="values contains non-finite"):
        score_function_surrogate(log_prob, torch.tensor([1.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="g_con contains non-finite"):
        dynamic_barrier_direction(torch.ones(4), torch.tensor([1.0, float("nan"), 0.0, 0.0]), 0.1)
    with pytest.raises(ValueError, match="con_value must be finite"):
        dynamic_barrier_direction(torch.ones(4), torch.ones(4), float("nan"))


def test_skip_predict_agent_width_mismatch(bert_inputs):
    ids, mask = bert_inputs
    with pytest.raises(ValueError, match="agent outputs 4 decisions but the model has 6"):
        skip_predict(_bert(), SkipAgent(32, 4), ids, mask)


def test_classifier_num_labels_checked():
    with pytest.raises(ValueError, match="num_labels"):
        SwitchableClassifier(_bert().backbone, num_labels=0)


def _policy(method, accuracy, flops, **setting):
    return {"method": method, "accuracy": accuracy, "flops": flops, "static_envelope_at_same_flops": accuracy + 0.004,
            **setting}


def test_summary_row_names_flops_point():
    from alignbook.switchable import _text_summary
    text = {"chosen_policy": 0, "policies": [
        _policy("barrier", 0.8527, 0.25, eps=0.0), _policy("barrier", 0.8600, 0.461, constraint="budget", budget=0.6),
        _policy("barrier", 0.8587, 0.644, constraint="budget", budget=0.8), _policy("lagrangian", 0.862, 1.0)]}
    row = _text_summary("agnews", text)
    assert "at 0.461 FLOPs" in row["metric"]
    assert "budget 0.6" in row["metric"]
    assert row["method"] == 0.8600
    assert row["baseline"] == pytest.approx(0.8640)


def test_tradeoff_labels_accuracy_barrier_apart():
    import matplotlib
    matplotlib.use("Agg")
    point = [{"flops": 0.5, "accuracy": 0.9}]
    results = {"static": {"layer_drop": point, "greedy": point, "best_pattern": point}, "early_exit": point,
               "policies": [_policy("barrier", 0.9, 0.4, eps=0.0),
                            _policy("barrier", 0.9, 0.5, quality="accuracy", eps=0.0)]}
    fig = plot_tradeoff(results)
    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert "switchable (barrier)" in labels
    assert "switchable (barrier, accuracy drop)" in labels
