import numpy as np
import pytest

from lowshot.results.stats import bootstrap_ci


def test_bootstrap_ci_contains_the_point_estimate_and_is_deterministic_for_a_seed():
    correct = np.random.default_rng(0).random(500) < 0.8
    point = 100 * correct.mean()
    low, high = bootstrap_ci(correct, seed=7)
    assert low < point < high
    assert 2.0 < high - low < 10.0  # binomial: 1.96 * sqrt(.8 * .2 / 500) * 2 ≈ 7 points
    assert bootstrap_ci(correct, seed=7) == (low, high)
    assert bootstrap_ci(correct, seed=8) != (low, high)


def test_bootstrap_ci_narrows_with_more_test_images_and_pairs_seeds():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(rng.random(200) < 0.7)
    large = bootstrap_ci(rng.random(20000) < 0.7)
    assert large[1] - large[0] < (small[1] - small[0]) / 5
    seeds = rng.random((3, 1000)) < 0.6
    low, high = bootstrap_ci(seeds)
    assert low < 100 * seeds.mean() < high
    assert bootstrap_ci(np.ones(50)) == (100.0, 100.0)


def test_bootstrap_ci_rejects_bad_arguments():
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones(5), n_boot=0)
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([]))


def test_mean_std_over_one_seed_has_no_std_and_over_two_the_sample_std():
    from lowshot.results.stats import mean_std

    assert mean_std([89.4]) == (89.4, None)  # a spread over one seed is undefined, not 0
    mean, std = mean_std([1.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(2 ** 0.5)  # n - 1
    with pytest.raises(ValueError):
        mean_std([])
