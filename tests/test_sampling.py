"""On-device batched sampling: greedy, filters, seeding and batch invariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.ops.sampling import SamplingArrays, filtered_logits, sample

V = 64


def _arrays(n: int, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0, seed=0) -> SamplingArrays:
    full = lambda v, dt: jnp.asarray(np.broadcast_to(np.asarray(v), (n,)), dt)
    return SamplingArrays(
        temperature=full(temperature, jnp.float32),
        top_k=full(top_k, jnp.int32),
        top_p=full(top_p, jnp.float32),
        min_p=full(min_p, jnp.float32),
        seed=full(seed, jnp.uint32),
        allowed=jnp.full((n, V // 32), -1, jnp.int32),
    )


def _logits(n: int, seed: int = 0) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(0, 2, (n, V)), jnp.float32)


def test_greedy_is_argmax_and_logprob_is_log_softmax() -> None:
    logits = _logits(8)
    tokens, logprobs = sample(logits, _arrays(8, temperature=0.0), jnp.zeros(8, jnp.int32))
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[:, None], 1)[:, 0]
    np.testing.assert_allclose(logprobs, expected, atol=1e-6)


def test_top_k_one_is_greedy() -> None:
    logits = _logits(8)
    tokens, _ = sample(logits, _arrays(8, temperature=1.5, top_k=1, seed=np.arange(8)), jnp.arange(8))
    np.testing.assert_array_equal(tokens, np.argmax(logits, -1))


def test_filters_keep_the_right_sets() -> None:
    logits = _logits(1)
    probs = np.asarray(jax.nn.softmax(logits[0]))
    order = np.argsort(-probs)
    kept = lambda **kw: set(np.flatnonzero(np.isfinite(np.asarray(filtered_logits(logits, _arrays(1, **kw))[0]))))
    assert kept(top_k=5) == set(order[:5])
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)])
    assert kept(top_p=0.6) == nucleus
    assert kept(min_p=0.2) == set(np.flatnonzero(probs >= 0.2 * probs.max()))
    assert kept() == set(range(V))


def _reference_keep(x: np.ndarray, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The filters by sorting, in float64: a token is kept when it is among the k largest values (all
    ties of the k-th included), less than top_p of the renormalised top-k mass lies strictly above its
    value, and its probability is at least min_p times the largest."""
    finite = np.isfinite(x)
    kth = np.sort(x[finite])[::-1][min(top_k, finite.sum()) - 1] if top_k > 0 else -np.inf
    in_k = finite & (x >= kth)
    probs = np.where(in_k, np.exp(x - x[finite].max()), 0.0)
    probs /= probs.sum()
    above = np.array([probs[x > v].sum() for v in x])
    keep = in_k & ((above < top_p) if top_p < 1 else True) & (x >= x[finite].max() + np.log(min_p) if min_p > 0 else True)
    return set(np.flatnonzero(keep))


def test_bisected_thresholds_match_a_sorting_reference() -> None:
    """Rows with tied values, masked (-inf) tokens and every filter mix, in one batch."""
    rng = np.random.default_rng(5)
    rows, settings = [], []
    for i in range(48):
        x = np.round(rng.normal(0, 2, V), 1 if i % 3 == 0 else 6)  # coarse rounding: many ties
        x[rng.random(V) < (0.5 if i % 4 == 0 else 0.0)] = -np.inf
        x[rng.integers(V)] = 3.0  # at least one finite token
        rows.append(x)
        settings.append((int(rng.choice([-1, 1, 3, 10, 40, 100])), float(rng.choice([1.0, 0.05, 0.5, 0.9, 0.99])), float(rng.choice([0.0, 0.0, 0.1]))))
    logits = jnp.asarray(np.stack(rows), jnp.float32)
    k, p, m = (list(col) for col in zip(*settings))
    got = np.asarray(jax.jit(filtered_logits)(logits, _arrays(48, top_k=k, top_p=p, min_p=m)))
    for x, (top_k, top_p, min_p), row in zip(rows, settings, got):
        kept = set(np.flatnonzero(np.isfinite(row)))
        assert kept == _reference_keep(x.astype(np.float32).astype(np.float64), top_k, top_p, min_p), (top_k, top_p, min_p)


def test_samples_follow_the_distribution() -> None:
    """Gumbel-max over 4000 seeds reproduces softmax(logits / T) within sampling error."""
    n = 4000
    logits = jnp.broadcast_to(_logits(1, seed=3)[0] / 2, (n, V))
    tokens, _ = sample(logits, _arrays(n, temperature=1.0, seed=np.arange(n)), jnp.zeros(n, jnp.int32))
    freq = np.bincount(np.asarray(tokens), minlength=V) / n
    probs = np.asarray(jax.nn.softmax(logits[0]))
    assert np.abs(freq - probs).max() < 0.03


def test_seeded_rows_are_batch_invariant() -> None:
    """A row's draw depends only on its logits, parameters, seed and position, not on other rows."""
    logits = _logits(6, seed=1)
    arrays = _arrays(6, temperature=[0.8, 1.0, 0.0, 1.3, 0.7, 1.0], top_p=[0.9, 1, 1, 0.5, 1, 0.95],
                     top_k=[-1, 10, -1, -1, 3, -1], seed=[11, 12, 13, 14, 15, 16])
    positions = jnp.asarray([5, 9, 2, 40, 7, 1], jnp.int32)
    together, _ = sample(logits, arrays, positions)
    for i in range(6):
        row = jax.tree.map(lambda a: a[i : i + 1], arrays)
        alone, _ = sample(logits[i : i + 1], row, positions[i : i + 1])
        assert int(alone[0]) == int(together[i])
    # Reversed batch order gives the same per-row tokens.
    rev, _ = sample(logits[::-1], jax.tree.map(lambda a: a[::-1], arrays), positions[::-1])
    np.testing.assert_array_equal(np.asarray(rev)[::-1], together)


def test_seed_and_position_both_change_the_draw() -> None:
    logits = jnp.zeros((64, V))
    draws = lambda seed, pos: np.asarray(sample(logits, _arrays(64, seed=seed), jnp.full(64, pos, jnp.int32))[0])
    np.testing.assert_array_equal(draws(5, 3), draws(5, 3))
    assert not np.array_equal(draws(5, 3), draws(6, 3))
    assert not np.array_equal(draws(5, 3), draws(5, 4))


def test_bitmask_allows_only_its_tokens_greedy_and_sampled() -> None:
    logits = _logits(4)
    allowed = np.zeros((4, V), bool)
    allowed[0, [3, 40]] = allowed[1, [63]] = allowed[2, :] = allowed[3, [0, 31, 32]] = True
    words = np.packbits(allowed, axis=1, bitorder="little").view(np.int32)  # [4, V / 32]
    run = jax.jit(sample)
    for temperature in (0.0, 1.0):
        s = _arrays(4, temperature=temperature, seed=np.arange(4))
        for position in range(20):
            tokens, _ = run(logits, s.replace(allowed=jnp.asarray(words)), jnp.full(4, position))
            assert all(allowed[r, t] for r, t in enumerate(np.asarray(tokens))), tokens
    greedy, _ = run(logits, _arrays(4, temperature=0.0).replace(allowed=jnp.asarray(words)), jnp.zeros(4, jnp.int32))
    assert int(greedy[2]) == int(np.argmax(logits[2]))  # an all-ones row is unconstrained
    assert int(greedy[0]) == [3, 40][int(np.argmax(np.asarray(logits)[0, [3, 40]]))]
