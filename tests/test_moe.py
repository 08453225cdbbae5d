"""Oracle tests for alignbook.moe: hand-computed router scores and gates, the scale identity of the cosine
router, top-K gates, the MoE layer, the Voronoi loss, the least-squares fit and the slope estimate.

The statistical test at the end runs the rate simulation (about 15 s of CPU time on one thread) and only
runs when ALIGNBOOK_SLOW=1 is set.
"""
import math
import os

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from alignbook.moe import (
    MoE, MoEParams, MoERateConfig, PerturbedCosineRouter, RouterSpec, empirical_rate, ffn_expert,
    fit_least_squares, initial_params, moe_regression_function, parameter_errors, rate_experiment,
    router_scores, sample_moe_regression, simulate_replications, topk_gate, voronoi_cells, voronoi_loss,
)

F64 = dict(dtype=torch.float64)
X_ORACLE = torch.tensor([[0.3, 0.5]], **F64)
BETA1 = torch.tensor([[0.6, -0.8], [1.0, 2.0]], **F64)
BETA0 = torch.tensor([0.1, -0.2], **F64)
A = torch.tensor([[1.0, -1.0], [0.5, 2.0]], **F64)
B = torch.tensor([0.2, -0.3], **F64)
NORM_X, NORM_B2 = math.sqrt(0.34), math.sqrt(5.0)


def _hand_scores(router, temperature, tau_w=0.5, tau_x=1.0):
    dots = (-0.22, 1.3)
    norms = (1.0, NORM_B2)
    if router == "linear":
        raw = dots
    elif router == "cosine":
        raw = [d / (nb * NORM_X) / temperature for d, nb in zip(dots, norms)]
    else:
        raw = [d / ((nb + tau_w) * (NORM_X + tau_x)) / temperature for d, nb in zip(dots, norms)]
    return [r + b for r, b in zip(raw, (0.1, -0.2))]


@pytest.mark.parametrize("router", ["linear", "cosine", "perturbed"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_scores_gates_output_hand_values(router, temperature):
    spec = RouterSpec(router, tau_w=0.5, tau_x=1.0, temperature=temperature)
    scores = spec.scores(X_ORACLE, BETA1, BETA0)[0]
    expected = _hand_scores(router, temperature)
    torch.testing.assert_close(scores, torch.tensor(expected, **F64), rtol=0, atol=1e-12)

    e = [math.exp(s) for s in expected]
    dense = [v / sum(e) for v in e]
    torch.testing.assert_close(scores.softmax(-1), torch.tensor(dense, **F64), rtol=0, atol=1e-12)
    top1 = topk_gate(scores[None], 1)[0][0]
    assert top1.tolist() == [0.0, 1.0] if expected[1] > expected[0] else [1.0, 0.0]

    # Experts: tanh(a_i . x + b_i) = tanh(0) and tanh(0.85) at this x.
    f = moe_regression_function(X_ORACLE, MoEParams(BETA1, BETA0, A, B), spec)
    assert abs(f.item() - dense[1] * math.tanh(0.85)) <= 1e-12


def test_cosine_scores_scale_invariant():
    g = torch.Generator().manual_seed(0)
    x, beta1 = torch.randn(6, 3, generator=g, **F64), torch.randn(4, 3, generator=g, **F64)
    cosine = router_scores(x, beta1, router="cosine")
    torch.testing.assert_close(router_scores(2.5 * x, 0.1 * beta1, router="cosine"), cosine, rtol=0, atol=1e-12)
    perturbed = router_scores(x, beta1, router="perturbed")
    assert (router_scores(x, 0.1 * beta1, router="perturbed") - perturbed).abs().max() > 0.1


def test_perturbed_tends_to_cosine_linearly():
    g = torch.Generator().manual_seed(1)
    x, beta1 = torch.randn(6, 3, generator=g, **F64), torch.randn(4, 3, generator=g, **F64)
    cosine = router_scores(x, beta1, router="cosine")
    errors = [(router_scores(x, beta1, router="perturbed", tau_w=t, tau_x=t) - cosine).abs().max().item()
              for t in (1e-2, 1e-3, 1e-4)]
    assert 9.0 < errors[0] / errors[1] < 11.0
    assert 9.0 < errors[1] / errors[2] < 11.0


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_radial_derivative_identity(temperature):
    g = torch.Generator().manual_seed(2)
    x, beta1 = torch.randn(5, 3, generator=g, **F64), torch.randn(4, 3, generator=g, **F64)
    beta0 = torch.randn(4, generator=g, **F64)
    for router, tau_w in (("cosine", None), ("perturbed", 0.5)):
        def scores(b):
            return router_scores(x, b, beta0, router=router, tau_w=tau_w or 1.0, tau_x=1.0, temperature=temperature)
        jac = jacobian(scores, beta1)                                          # (N, E, E, d)
        own = torch.stack([jac[:, i, i] for i in range(4)], 1)                 # (N, E, d)
        radial = (own * beta1).sum(-1)                                         # (N, E)
        if router == "cosine":
            expected = torch.zeros_like(radial)
        else:
            expected = (scores(beta1) - beta0) * tau_w / (beta1.norm(dim=-1) + tau_w)
        assert (radial - expected).abs().max() <= 1e-12, router


def test_topk_gate_properties():
    scores = torch.tensor([[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, 0.1, -2.0]], **F64)
    for k in range(1, 5):
        gates, indices = topk_gate(scores, k)
        torch.testing.assert_close(gates.sum(-1), torch.ones(2, **F64), rtol=0, atol=1e-12)
        assert (gates > 0).sum(-1).tolist() == [k, k]
        assert indices.shape == (2, k)
    torch.testing.assert_close(topk_gate(scores, 4)[0], scores.softmax(-1), rtol=0, atol=1e-12)
    assert topk_gate(scores, 1)[0].tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


def test_topk_selection_bias_changes_selection():
    scores = torch.tensor([[0.5, 2.0, -1.0, 1.0]], **F64)
    bias = torch.tensor([0.0, 0.0, 3.5, 0.0], **F64)
    assert topk_gate(scores, 2)[1].tolist() == [[1, 3]]
    gates, indices = topk_gate(scores, 2, selection_bias=bias)
    assert indices.tolist() == [[2, 1]]
    assert abs(gates[0, 2].item() - math.exp(-1.0) / (math.exp(-1.0) + math.exp(2.0))) <= 1e-12


@pytest.mark.parametrize("k", [0, 5, 1.5])
def test_topk_rejects_invalid_k(k):
    with pytest.raises(ValueError, match="top_k must be an int"):
        topk_gate(torch.zeros(2, 4), k)


def test_bad_router_input_raises():
    x, beta1 = torch.zeros(1, 2), torch.ones(3, 2)
    with pytest.raises(ValueError, match="zero-norm"):
        router_scores(x, beta1, router="cosine", eps=0.0)
    with pytest.raises(ValueError, match="tau_w > 0"):
        router_scores(x, beta1, router="perturbed", tau_w=0.0)
    with pytest.raises(ValueError, match="tau_x > 0"):
        PerturbedCosineRouter(2, 3, tau_x=-0.1)
    with pytest.raises(ValueError, match="expected"):
        MoEParams(BETA1, BETA0[:1], A, B)
    assert torch.isfinite(router_scores(x, beta1, router="perturbed")).all()


def test_moe_layer_matches_regression_function():
    router = PerturbedCosineRouter(2, 2, temperature=0.5, tau_w=0.5, tau_x=1.0).double()
    experts = [ffn_expert(2).double() for _ in range(2)]
    with torch.no_grad():
        router.weight.copy_(BETA1)
        router.bias.copy_(BETA0)
        for i, expert in enumerate(experts):
            expert[0].weight.copy_(A[i:i + 1])
            expert[0].bias.copy_(B[i:i + 1])
    spec = RouterSpec("perturbed", tau_w=0.5, tau_x=1.0, temperature=0.5)
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(3), **F64)
    for top_k in (None, 1, 2):
        y, aux = MoE(router, experts, top_k=top_k)(x)
        expected = moe_regression_function(x, MoEParams(BETA1, BETA0, A, B), spec, top_k=top_k)
        torch.testing.assert_close(y[:, 0], expected, rtol=0, atol=1e-12)
        assert set(aux) == {"scores", "gates", "indices"}


def test_voronoi_loss_literal_example():
    def t(values):
        return torch.tensor(values, **F64)
    true = MoEParams(t([[0.0], [1.0]]), t([0.0, 0.0]), t([[0.0], [1.0]]), t([0.0, 1.0]))
    fitted = MoEParams(t([[0.1], [-0.1], [1.0]]), t([math.log(0.5), math.log(0.6), 0.0]), t([[0.0], [0.0], [1.0]]),
                       t([0.0, 0.0, 1.2]))
    assert voronoi_cells(fitted, true) == [[0, 1], [2]]
    assert abs(voronoi_loss(fitted, true).item() - 0.311) <= 1e-12
    permuted = fitted.apply(lambda v: v[torch.tensor([2, 0, 1])])
    assert abs(voronoi_loss(permuted, true).item() - 0.311) <= 1e-12


def test_voronoi_loss_zero_at_truth_and_split():
    truth = MoERateConfig().true_params()
    assert voronoi_loss(truth, truth).item() == 0.0
    split = initial_params(truth, 3, noise=0.0)
    assert voronoi_cells(split, truth) == [[0, 1], [2]]
    assert voronoi_loss(split, truth).item() <= 1e-15


def test_least_squares_truth_is_stationary():
    config = MoERateConfig(sigma=0.0, reps=2, ns=(200, 400))
    truth, spec = config.true_params(), config.router_spec("perturbed")
    X, Y = sample_moe_regression(400, truth, spec, sigma=0.0, generator=torch.Generator().manual_seed(0))
    params = truth.apply(lambda v: v.clone().requires_grad_(True))
    mse = (Y - moe_regression_function(X, params, spec)).square().mean()
    grads = torch.autograd.grad(mse, [params.beta1, params.beta0, params.a, params.b])
    assert mse.item() == 0.0
    assert max(g.abs().max().item() for g in grads) == 0.0


def test_batched_fit_equals_single_fits():
    config = MoERateConfig(reps=3, ns=(800, 1600))
    X, Y, init = simulate_replications(config, "perturbed", 800)
    spec = config.router_spec("perturbed")
    fitted, info = fit_least_squares(X, Y, init, spec)
    assert info["converged"].all()
    for r in range(3):
        single, _ = fit_least_squares(X[r], Y[r], init.apply(lambda v: v[r]), spec)
        torch.testing.assert_close(single.beta1, fitted.beta1[r], rtol=0, atol=1e-10)
        torch.testing.assert_close(single.a, fitted.a[r], rtol=0, atol=1e-10)
    truth = config.true_params()
    mse_true = (Y - moe_regression_function(X, truth.expand(3), spec)).square().mean(-1)
    assert (info["mse"] <= mse_true + 1e-12).all()


def test_lbfgs_reaches_lm_minimiser():
    config = MoERateConfig(reps=2, ns=(800, 1600))
    X, Y, init = simulate_replications(config, "perturbed", 800)
    spec = config.router_spec("perturbed")
    lm, lm_info = fit_least_squares(X, Y, init, spec, optimizer="lm")
    lbfgs, lbfgs_info = fit_least_squares(X, Y, init, spec, optimizer="lbfgs")
    # In a flat valley (here replication 1) both optimisers stop where a step lowers the loss by less than
    # their tolerance, so they agree to 1e-12 in MSE but only to about 1e-5 in the parameters.
    torch.testing.assert_close(lbfgs.beta1, lm.beta1, rtol=0, atol=1e-4)
    torch.testing.assert_close(lbfgs_info["mse"], lm_info["mse"], rtol=0, atol=1e-12)


def test_parameter_errors_radial_and_angle():
    truth = MoERateConfig().true_params()
    longer = MoEParams(truth.beta1 * torch.tensor([[1.5], [1.0]], **F64), truth.beta0, truth.a, truth.b)
    errors = parameter_errors(longer, truth)
    assert abs(errors["radial"].item() - 0.5) <= 1e-12
    assert abs(errors["angle"].item()) <= 1e-12


def test_slope_of_exact_power_law():
    ns = np.array([1e3, 2e3, 4e3, 8e3])
    slope, (lo, hi) = empirical_rate(ns, 2.0 * ns[:, None] ** -0.5 * np.ones((4, 6)))
    assert abs(slope + 0.5) <= 1e-12
    assert abs(lo + 0.5) <= 1e-12
    assert abs(hi + 0.5) <= 1e-12


@pytest.mark.skipif(os.environ.get("ALIGNBOOK_SLOW") != "1", reason="statistical simulation; set ALIGNBOOK_SLOW=1 to run it")
def test_radial_error_direction_of_effects():
    config = MoERateConfig(ns=(1000, 16000), reps=8, n_boot=100)
    results = {router: rate_experiment(config, router, progress=False) for router in ("cosine", "perturbed")}
    perturbed = results["perturbed"]["radial"].mean(-1)
    cosine = results["cosine"]["radial"].mean(-1)
    assert perturbed[1] < perturbed[0]
    assert cosine[1] > 0.8 * cosine[0]
