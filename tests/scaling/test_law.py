"""The Chinchilla law: refitting known laws, the closed-form optimum against brute force, the published anchor."""
import math

import numpy as np
import pytest

from llmforge.scaling.law import BESIROGLU_2024, ScalingLaw, fit

KNOWN = ScalingLaw(E=1.70, A=400.0, B=1800.0, alpha=0.34, beta=0.28)


def grid_points(law, noise=0.0, seed=0):
    n, d = np.meshgrid(np.logspace(7, 9.5, 6), np.logspace(9, 11.5, 6))
    n, d = n.ravel(), d.ravel()
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.shape))
    return n, d, loss


def test_noise_free_points_give_the_law_back_exactly():
    law, stats = fit(*grid_points(KNOWN))
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, k) == pytest.approx(getattr(KNOWN, k), rel=1e-4), k
    assert stats["residual"] < 1e-12 and stats["points"] == 36


def test_noisy_points_recover_the_exponents():
    """0.5% multiplicative noise (a typical seed-to-seed spread of final losses): exponents within +-0.03,
    E within +-0.1 (E trades off against A and B) and the compute-optimal N at 1e22 FLOPs within a factor 1.5."""
    law, stats = fit(*grid_points(KNOWN, noise=0.005, seed=0))
    assert abs(law.alpha - KNOWN.alpha) <= 0.03
    assert abs(law.beta - KNOWN.beta) <= 0.03
    assert abs(law.E - KNOWN.E) <= 0.1
    assert 1 / 1.5 < law.optimum(1e22)[0] / KNOWN.optimum(1e22)[0] < 1.5
    assert stats["max_rel_error"] < 0.02


@pytest.mark.parametrize("law", [BESIROGLU_2024, KNOWN], ids=["besiroglu", "known"])
@pytest.mark.parametrize("flops", [1e15, 1e19, 5.76e23, 1e26])
def test_closed_form_optimum_equals_brute_force_over_n(law, flops):
    n_star, d_star = law.optimum(flops)
    n = np.logspace(math.log10(n_star) - 2, math.log10(n_star) + 2, 400001)   # step 1e-5 decades
    brute = n[np.argmin(law.loss(n, flops / (6 * n)))]
    assert brute == pytest.approx(n_star, rel=1e-4)
    assert 6 * n_star * d_star == pytest.approx(flops)


def test_default_law_at_chinchillas_budget_is_near_70b_on_1_4t():
    """Besiroglu et al. 2024's re-fit: ~72B parameters on ~1.33T tokens at 5.76e23 FLOPs (Chinchilla: 70B, 1.4T)."""
    n, d = BESIROGLU_2024.optimum(5.76e23)
    assert n == pytest.approx(7.225e10, rel=1e-3)
    assert d == pytest.approx(1.3287e12, rel=1e-3)
    assert 60e9 < n < 85e9 and 1.1e12 < d < 1.6e12
