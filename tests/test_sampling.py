import numpy as np
import pytest

from shoprank.data.sampling import sample_negatives, user_rng


@pytest.mark.parametrize("n_items,k", [(10, 9), (100, 3), (5000, 99)])
def test_negatives_never_include_the_positive(n_items, k):
    rng = np.random.default_rng(0)
    for trial in range(200):
        positive = trial % n_items
        history = rng.integers(0, n_items, size=3)
        exclude = np.concatenate([[positive], history])
        neg = sample_negatives(rng, n_items, exclude, min(k, n_items - len(np.unique(exclude))))
        assert positive not in neg
        assert not np.isin(neg, exclude).any()
        assert len(np.unique(neg)) == len(neg)


def test_too_few_items_is_a_clear_error():
    with pytest.raises(ValueError, match="data.negatives"):
        sample_negatives(np.random.default_rng(0), 5, np.array([0, 1]), 4)


def test_user_rng_is_stable():
    a = user_rng(3, "u1").integers(0, 10**9, 5)
    b = user_rng(3, "u1").integers(0, 10**9, 5)
    c = user_rng(3, "u2").integers(0, 10**9, 5)
    assert (a == b).all() and not (a == c).all()
