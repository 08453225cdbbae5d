"""Oracle tests for alignbook.sliced: agreement with POT, invariances, closed forms and input checks."""
import math

import numpy as np
import ot
import pytest
import torch

from alignbook.sliced import (
    distributional_sliced_wasserstein,
    energy_based_sliced_wasserstein,
    iwrpsw,
    kappa_schedule,
    max_sliced_wasserstein,
    power_spherical_sample,
    projected_costs,
    random_path_projections,
    rpsw,
    sliced_gradient_flow,
    sliced_wasserstein,
    two_shapes,
)

EXACT = 1e-12  # float64 agreement between two exact computations of the same quantity


@pytest.fixture
def clouds():
    rs = np.random.RandomState(0)
    return rs.randn(40, 4), rs.randn(40, 4) * np.array([2.0, 1.0, 0.5, 1.0]) + 0.3


def _weights(n, seed):
    w = np.random.RandomState(seed).rand(n) + 0.1
    return w / w.sum()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("m", [40, 23])
@pytest.mark.parametrize("weighted", [False, True])
def test_fixed_projections_match_pot(clouds, p, m, weighted):
    xs, xt = clouds[0], clouds[1][:m]
    a, b = (_weights(40, 1), _weights(m, 2)) if weighted else (None, None)
    proj = ot.sliced.get_random_projections(4, 30, seed=5)
    ours = sliced_wasserstein(xs, xt, a, b, p=p, projections=proj)
    pot = ot.sliced_wasserstein_distance(xs, xt, a, b, p=p, projections=proj)
    assert ours == pytest.approx(pot, abs=EXACT)


def test_fixed_projections_log_matches_pot(clouds):
    proj = ot.sliced.get_random_projections(4, 30, seed=5)
    _, ours = sliced_wasserstein(*clouds, projections=proj, log=True)
    _, pot = ot.sliced_wasserstein_distance(*clouds, projections=proj, log=True)
    np.testing.assert_allclose(ours["projected_emds"], pot["projected_emds"], atol=EXACT)
    np.testing.assert_array_equal(ours["projections"], proj)


def test_numpy_seed_matches_pot(clouds):
    for seed in (0, 7):
        assert sliced_wasserstein(*clouds, seed=seed) == pytest.approx(
            ot.sliced_wasserstein_distance(*clouds, seed=seed), abs=EXACT)
    ours = sliced_wasserstein(*clouds, seed=np.random.RandomState(3))
    pot = ot.sliced_wasserstein_distance(*clouds, seed=np.random.RandomState(3))
    assert ours == pytest.approx(pot, abs=EXACT)


def test_torch_seed_matches_pot(clouds):
    xs, xt = map(torch.from_numpy, clouds)
    ours = sliced_wasserstein(xs, xt, seed=11)
    pot = ot.sliced_wasserstein_distance(xs, xt, seed=11)
    assert float(ours) == pytest.approx(float(pot), abs=EXACT)
    ours = sliced_wasserstein(xs, xt, seed=torch.Generator().manual_seed(4))
    pot = ot.sliced_wasserstein_distance(xs, xt, seed=torch.Generator().manual_seed(4))
    assert float(ours) == pytest.approx(float(pot), abs=EXACT)


def test_backends_and_dtypes_preserved(clouds):
    value = sliced_wasserstein(*clouds, seed=0)
    assert isinstance(value, np.float64)
    value32 = rpsw(clouds[0].astype(np.float32), clouds[1].astype(np.float32), seed=0)
    assert isinstance(value32, np.float32)
    tensor = iwrpsw(torch.tensor(clouds[0], dtype=torch.float32), torch.tensor(clouds[1], dtype=torch.float32), seed=0)
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.float32
    assert tensor.dim() == 0


def test_float32_close_to_float64(clouds):
    proj = ot.sliced.get_random_projections(4, 30, seed=5)
    v64 = sliced_wasserstein(*clouds, projections=proj)
    v32 = sliced_wasserstein(clouds[0].astype(np.float32), clouds[1].astype(np.float32), projections=proj)
    assert v32 == pytest.approx(v64, rel=1e-5)


def test_float32_weighted_unequal_matches_pot(clouds):
    xs, xt = clouds[0].astype(np.float32), clouds[1][:23].astype(np.float32)
    a, b = _weights(40, 1).astype(np.float32), _weights(23, 2).astype(np.float32)
    proj = ot.sliced.get_random_projections(4, 30, seed=5).astype(np.float32)
    ours = sliced_wasserstein(xs, xt, a, b, projections=proj)
    pot = ot.sliced_wasserstein_distance(xs, xt, a, b, projections=proj)
    assert ours == pytest.approx(pot, rel=1e-5)


@pytest.mark.parametrize("distance", [sliced_wasserstein, energy_based_sliced_wasserstein, rpsw, iwrpsw])
def test_translation_invariant_pathwise(clouds, distance):
    shift = np.array([3.0, -1.0, 0.5, 10.0])
    assert distance(clouds[0] + shift, clouds[1] + shift, seed=2) == pytest.approx(distance(*clouds, seed=2), abs=1e-10)


def test_scaling(clouds):
    proj = ot.sliced.get_random_projections(4, 30, seed=5)
    for alpha in (-2.5, 0.5):
        scaled = sliced_wasserstein(alpha * clouds[0], alpha * clouds[1], projections=proj)
        assert scaled == pytest.approx(abs(alpha) * sliced_wasserstein(*clouds, projections=proj), abs=1e-12)
    assert rpsw(4 * clouds[0], 4 * clouds[1], seed=1) == pytest.approx(4 * rpsw(*clouds, seed=1), abs=1e-12)
    # IW weights are a softmax of alpha^p W, so IWRPSW is not homogeneous.
    assert iwrpsw(4 * clouds[0], 4 * clouds[1], seed=1) != pytest.approx(4 * iwrpsw(*clouds, seed=1), abs=1e-6)


@pytest.mark.parametrize("distance", [sliced_wasserstein, energy_based_sliced_wasserstein, rpsw, iwrpsw,
                                      max_sliced_wasserstein, distributional_sliced_wasserstein])
def test_identity_is_zero_without_nan(clouds, distance):
    xs = torch.tensor(clouds[0], requires_grad=True)
    value = distance(xs, xs.detach(), seed=0).detach()
    assert float(value) == 0.0


def test_coincident_pairs_give_finite_directions():
    x = torch.zeros(3, 5)
    dirs = random_path_projections(x, x, 50, kappa=50.0, seed=0)
    assert torch.isfinite(dirs).all()
    torch.testing.assert_close(dirs.norm(dim=0), torch.ones(50))


@pytest.mark.parametrize("distance", [sliced_wasserstein, energy_based_sliced_wasserstein, rpsw, iwrpsw,
                                      max_sliced_wasserstein, distributional_sliced_wasserstein])
def test_one_dimension_equals_exact_wasserstein(distance):
    rs = np.random.RandomState(3)
    xs, xt = rs.randn(25, 1), rs.randn(25, 1) * 2 + 1
    for p in (1, 2):
        exact = ot.wasserstein_1d(xs[:, 0], xt[:, 0], p=p) ** (1 / p)
        assert distance(xs, xt, p=p, seed=0) == pytest.approx(exact, abs=1e-12)


def _ps_second_moment(kappa, d):
    s = d - 1
    return (s**2 + 2 * kappa * s + kappa**2 * (s + kappa + 1)) / ((s + kappa) ** 2 * (s + kappa + 1))


def test_point_mass_closed_forms():
    d = 5
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0]], dtype=torch.float64)
    y = torch.zeros(1, d, dtype=torch.float64)
    gap = float((x - y).norm())
    many = 300_000
    assert float(sliced_wasserstein(x, y, n_projections=many, seed=0)) == pytest.approx(gap / math.sqrt(d), rel=0.01)
    sw1 = gap * math.gamma(d / 2) / (math.sqrt(math.pi) * math.gamma((d + 1) / 2))
    assert float(sliced_wasserstein(x, y, n_projections=many, p=1, seed=0)) == pytest.approx(sw1, rel=0.01)
    for kappa in (1.0, 20.0):
        expected = gap * math.sqrt(_ps_second_moment(kappa, d))
        assert float(rpsw(x, y, n_projections=many, kappa=kappa, seed=0)) == pytest.approx(expected, rel=0.01)
    assert float(rpsw(x, y, n_projections=20, kappa=1e9, seed=0)) == pytest.approx(gap, rel=1e-6)
    assert float(max_sliced_wasserstein(x, y, n_iter=200, seed=0)) == pytest.approx(gap, rel=1e-3)


def test_kappa_one_matches_sw_and_ebsw(clouds):
    xs, xt = clouds[0][:6, :3], clouds[1][:6, :3]
    many = 300_000
    assert rpsw(xs, xt, n_projections=many, kappa=1.0, seed=1) == pytest.approx(
        sliced_wasserstein(xs, xt, n_projections=many, seed=2), rel=5e-3)
    assert iwrpsw(xs, xt, n_projections=many, kappa=1.0, seed=1) == pytest.approx(
        energy_based_sliced_wasserstein(xs, xt, n_projections=many, seed=2), rel=5e-3)


def test_kappa_infinity_is_average_over_pair_directions():
    rs = np.random.RandomState(4)
    xs, xt = rs.randn(4, 3), rs.randn(5, 3) + 1
    pairs = (xs[:, None, :] - xt[None, :, :]).reshape(-1, 3)
    pairs /= np.linalg.norm(pairs, axis=1, keepdims=True)
    exact = ot.sliced_wasserstein_distance(xs, xt, projections=pairs.T) ** 2
    n_draws = 40_000
    value, record = rpsw(xs, xt, n_projections=n_draws, kappa=1e9, seed=0, log=True)
    stderr = record["projected_emds"].std() / math.sqrt(n_draws)
    assert abs(value**2 - exact) < 4 * stderr


def test_power_spherical_moments_and_corners():
    g = torch.Generator().manual_seed(0)
    d = 6
    loc = torch.nn.functional.normalize(torch.randn(1, d, generator=g, dtype=torch.float64), dim=1)
    for kappa in (0.0, 3.0, 50.0):
        draws = power_spherical_sample(loc.expand(100_000, d), kappa, g)
        torch.testing.assert_close(draws.norm(dim=1), torch.ones(100_000, dtype=torch.float64))
        assert float((draws @ loc.T).mean()) == pytest.approx(kappa / (kappa + d - 1), abs=0.01)
    for corner in (torch.eye(d)[:1], -torch.eye(d)[:1]):
        draws = power_spherical_sample(corner.expand(500, d), 1e4, g)
        assert torch.isfinite(draws).all()
    per_row = power_spherical_sample(loc.expand(2, d), torch.tensor([0.0, 1e6]), g)
    assert float(per_row[1] @ loc[0]) == pytest.approx(1.0, abs=1e-4)


def test_gradient_matches_formula_and_pot():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(15, 3, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(15, 3, generator=g, dtype=torch.float64)
    theta = torch.nn.functional.normalize(torch.randn(3, 1, generator=g, dtype=torch.float64), dim=0)
    sliced_wasserstein(xs, xt, projections=theta).pow(2).backward()
    u = (xs @ theta)[:, 0].detach()
    matched = (xt @ theta)[:, 0].sort().values[u.argsort().argsort()]
    torch.testing.assert_close(xs.grad, (2 / 15) * (u - matched)[:, None] * theta.T, atol=EXACT, rtol=0)

    many = torch.nn.functional.normalize(torch.randn(3, 25, generator=g, dtype=torch.float64), dim=0)
    for m in (15, 11):
        ours = xs.detach().clone().requires_grad_()
        theirs = xs.detach().clone().requires_grad_()
        sliced_wasserstein(ours, xt[:m], projections=many).backward()
        ot.sliced_wasserstein_distance(theirs, xt[:m], projections=many).backward()
        torch.testing.assert_close(ours.grad, theirs.grad, atol=EXACT, rtol=0)


def test_gradcheck_both_paths():
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    xt = torch.randn(9, 2, generator=g, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, t: projected_costs(a, b, t, p=2), (xs, xt, theta))
    assert torch.autograd.gradcheck(lambda a, b, t: projected_costs(a, b[:7], t, p=2), (xs, xt, theta))
    # A block budget smaller than one direction's points forces the recompute-in-backward path.
    assert torch.autograd.gradcheck(lambda a, b, t: projected_costs(a, b, t, p=3, block_elements=1), (xs, xt, theta))


def test_gradients_reach_supports_for_every_variant():
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(20, 3, generator=g)
    for distance in (sliced_wasserstein, energy_based_sliced_wasserstein, rpsw, iwrpsw, max_sliced_wasserstein,
                     distributional_sliced_wasserstein):
        xs = torch.randn(20, 3, generator=g, requires_grad=True)
        distance(xs, xt, seed=0).backward()
        assert xs.grad is not None, distance.__name__
        assert torch.isfinite(xs.grad).all(), distance.__name__
        assert xs.grad.abs().sum() > 0, distance.__name__


def test_detach_weights_changes_only_gradient(clouds):
    xs = torch.tensor(clouds[0], requires_grad=True)
    xt = torch.tensor(clouds[1])
    through_weights, detached = iwrpsw(xs, xt, seed=0), iwrpsw(xs, xt, seed=0, detach_weights=True)
    assert float(through_weights.detach()) == pytest.approx(float(detached.detach()), abs=EXACT)
    (grad_through_weights,) = torch.autograd.grad(through_weights, xs)
    (grad_detached,) = torch.autograd.grad(detached, xs)
    assert not torch.allclose(grad_through_weights, grad_detached)


def test_sum_versus_mean_reduction(clouds):
    n = clouds[0].shape[0]
    for distance in (sliced_wasserstein, rpsw):
        for p in (1, 2):
            summed = distance(*clouds, p=p, seed=3, point_reduction="sum")
            assert summed == pytest.approx(n ** (1 / p) * distance(*clouds, p=p, seed=3), abs=1e-10)
    assert iwrpsw(*clouds, seed=3, point_reduction="sum") != pytest.approx(
        n**0.5 * iwrpsw(*clouds, seed=3), rel=1e-6)


def test_rpsw_estimator_is_unbiased():
    rs = np.random.RandomState(5)
    xs, xt = torch.tensor(rs.randn(5, 3)), torch.tensor(rs.randn(5, 3) * 2)
    population = float(rpsw(xs, xt, n_projections=400_000, kappa=10.0, seed=0)) ** 2
    g = torch.Generator().manual_seed(1)
    draws = np.array([float(rpsw(xs, xt, n_projections=10, kappa=10.0, seed=g)) ** 2 for _ in range(800)])
    assert abs(draws.mean() - population) < 3 * draws.std() / math.sqrt(len(draws)) + 0.01 * population


def test_ordering_on_elongated_clouds():
    g = torch.Generator().manual_seed(6)
    xs = torch.randn(200, 8, generator=g, dtype=torch.float64)
    xt = torch.randn(200, 8, generator=g, dtype=torch.float64) * torch.tensor([4.0] + [1.0] * 7, dtype=torch.float64)
    k = 4000
    sw = float(sliced_wasserstein(xs, xt, n_projections=k, seed=0))
    rp = [float(rpsw(xs, xt, n_projections=k, kappa=kappa, seed=0)) for kappa in (10.0, 50.0, 1e9)]
    msw = float(max_sliced_wasserstein(xs, xt, n_iter=50, seed=0))
    assert sw <= rp[0] <= rp[1] <= rp[2] <= msw
    # At kappa = 1 IWRPSW equals EBSW in expectation (tested above); larger kappa moves it up.
    ebsw = float(energy_based_sliced_wasserstein(xs, xt, n_projections=k, seed=0))
    for kappa in (10.0, 50.0):
        assert ebsw <= float(iwrpsw(xs, xt, n_projections=k, kappa=kappa, seed=0))


def test_kappa_schedule_endpoints():
    assert kappa_schedule(0, 501) == 100.0
    assert kappa_schedule(500, 501) == pytest.approx(1.0)
    values = [kappa_schedule(t, 501, 50.0) for t in range(501)]
    assert all(later <= earlier for earlier, later in zip(values, values[1:]))


def test_flow_is_seeded_and_moves_towards_target():
    source, target = two_shapes(150, seed=2)
    runs = [sliced_gradient_flow(source, target, rpsw, n_steps=31, log_steps=(0, 30), seed=4, n_projections=10,
                                 point_reduction="sum", kappa=20.0) for _ in range(2)]
    torch.testing.assert_close(runs[0][30]["points"], runs[1][30]["points"], atol=0, rtol=0)
    assert runs[0][30]["w2_squared"] < 0.9 * runs[0][0]["w2_squared"]


@pytest.mark.parametrize("call, message", [
    (lambda x: sliced_wasserstein(x, x[:, :2]), "dimension 3 but X_t has dimension 2"),
    (lambda x: sliced_wasserstein(x, x, a=np.full(10, -0.1)), "negative weight"),
    (lambda x: sliced_wasserstein(x, x, b=np.full(10, 0.2)), "b sums to 2"),
    (lambda x: sliced_wasserstein(x, x, p=0.5), "p must be a finite number >= 1"),
    (lambda x: sliced_wasserstein(x, x, n_projections=0), "n_projections must be a positive integer"),
    (lambda x: rpsw(x, x, kappa=-1.0), "kappa must be finite and >= 0"),
    (lambda x: iwrpsw(x, np.where(x > 0, np.inf, x)), "X_t contains non-finite"),
    (lambda x: sliced_wasserstein(x, x, projections=np.ones((2, 5))), "projections has shape (2, 5)"),
    (lambda x: sliced_wasserstein(x, x[:7], point_reduction="sum"), "needs N = M"),
    (lambda x: max_sliced_wasserstein(x, x, optimizer="lbfgs"), "optimizer must be 'sgd' or 'adam'"),
])
def test_bad_input_raises_with_the_value(call, message):
    x = np.random.RandomState(0).randn(10, 3)
    with pytest.raises(ValueError, match=None) as info:
        call(x)
    assert message in str(info.value)
