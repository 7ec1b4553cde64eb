import torch

from detector import rng


def test_streams_do_not_depend_on_the_batch():
    keys = rng.model_keys([3, 5, 7], rng.BATCH)
    together = rng.normal(keys, 11, (4, 5))
    alone = rng.normal(keys[1:2], 11, (4, 5))
    assert torch.equal(together[1:2], alone)


def test_counters_and_purposes_give_different_draws():
    k = rng.model_keys([0], rng.BATCH)
    assert not torch.equal(rng.uniform(k, 0, (8,)), rng.uniform(k, 1, (8,)))
    assert not torch.equal(rng.uniform(k, 0, (8,)), rng.uniform(rng.model_keys([0], rng.LATENT), 0, (8,)))


def test_distribution_moments():
    z = rng.normal(rng.model_keys(list(range(50)), rng.SCORE), 0, (4000,))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    u = rng.uniform(rng.model_keys([1], rng.SCORE), 0, (100_000,))
    assert 0 < float(u.min()) and float(u.max()) < 1
