"""The client's local memory: write, merge, expire, retrieve, drift and prototypes (SPEC §4)."""

from __future__ import annotations

import numpy as np
import torch

from feddmmr.federation.memory import ItemSpace, LocalMemory, MemoryConfig, client_threshold, novelty


def space_from_vectors(vectors: list[list[float]]) -> ItemSpace:
    """Item i+1 gets vectors[i] as its (visual) feature; item 0 is padding."""
    table = torch.zeros(len(vectors) + 1, len(vectors[0]))
    table[1:] = torch.tensor(vectors)
    return ItemSpace(table, None)


def axis_space(count: int) -> ItemSpace:
    """Mutually orthogonal items: every item is fully novel to every other."""
    return space_from_vectors(np.eye(count).tolist())


def test_novelty_is_one_minus_max_similarity_to_the_window():
    space = space_from_vectors([[1, 0], [1, 0], [0.6, 0.8], [0, 1]])
    items = np.array([1, 2, 3, 4])
    values = novelty(space, items, 0, window=2)
    assert values[0] == 1.0  # empty window
    assert np.isclose(values[1], 0.0)  # identical to item 1
    assert np.isclose(values[2], 0.4)  # cos 0.6 with items 1 and 2
    assert np.isclose(values[3], 0.2)  # window is items 2,3: cos 0 and 0.8
    assert np.isclose(novelty(space, items, 0, window=1)[3], 0.2)


def test_only_novel_items_are_written():
    space = space_from_vectors([[1, 0], [1, 0], [0, 1]])
    memory = LocalMemory(MemoryConfig(st_window=5), space, threshold=0.5)
    memory.observe(np.array([1, 2, 3]))
    assert memory.lt_items.tolist() == [1, 3]  # item 2 duplicates item 1 in the ST window
    assert memory.step == 3 and memory.recent.tolist() == [1, 2, 3]


def test_near_duplicate_raises_frequency_instead_of_writing():
    space = space_from_vectors([[1, 0, 0], [0, 1, 0], [0.99, 0.141, 0]])
    memory = LocalMemory(MemoryConfig(st_window=1, duplicate_threshold=0.74), space, threshold=0.5)
    memory.observe(np.array([1, 2, 3]))  # 3 is novel w.r.t. the window {2} but near item 1 in LT
    assert memory.lt_items.tolist() == [1, 2]
    assert memory.lt_freq.tolist() == [2.0, 1.0]
    assert memory.lt_last.tolist() == [2.0, 1.0]


def test_full_memory_expires_the_lowest_utility_entry():
    space = axis_space(6)
    config = MemoryConfig(st_window=1, lt_capacity=3, recency_half_life=1.0, recency_weight=0.6)
    memory = LocalMemory(config, space, threshold=0.5)
    memory.observe(np.array([1, 2, 3]))
    memory.lt_freq[:] = [1.0, 5.0, 1.0]  # item 2 is frequent, item 1 is oldest and rare
    memory.observe(np.array([4]))
    assert sorted(memory.lt_items.tolist()) == [2, 3, 4]
    memory.observe(np.array([5]))  # now item 3 is the oldest rare entry; frequent item 2 survives
    assert sorted(memory.lt_items.tolist()) == [2, 4, 5]


def test_retrieve_mixes_recent_and_long_term_and_pads_with_zero():
    space = axis_space(30)
    config = MemoryConfig(st_window=4, top_k=8, st_fraction=0.25)
    memory = LocalMemory(config, space, threshold=0.5)
    assert memory.retrieve().tolist() == [0] * 8  # empty memory
    memory.observe(np.arange(1, 21))
    got = memory.retrieve()
    assert len(got) == 8 and len(set(got.tolist())) == 8
    recent = set(range(17, 21))
    assert set(got.tolist()) & recent  # the ST share is there
    assert set(got.tolist()) - recent  # and long-term entries too
    assert 0 not in got


def test_retrieval_share_of_recent_items_grows_with_drift():
    # long-term interest along axis 0, recent items along axis 1
    vectors = [[1, 0.05 * i, 0] for i in range(10)] + [[0, 1, 0.05 * i] for i in range(10)]
    space = space_from_vectors(vectors)
    config = MemoryConfig(st_window=5, top_k=8, st_fraction=0.25, lt_capacity=50)
    steady = LocalMemory(config, space, threshold=-1.0)
    steady.observe(np.arange(1, 11))
    drifting = LocalMemory(config, space, threshold=-1.0)
    drifting.observe(np.arange(1, 21))
    assert drifting.drift() > steady.drift()
    recent = set(range(16, 21))
    assert len(set(drifting.retrieve().tolist()) & recent) > 2  # more than the 25 % base share


def test_without_long_term_memory_retrieval_is_the_recent_window():
    space = axis_space(12)
    memory = LocalMemory(MemoryConfig(st_window=4, top_k=6, lt_capacity=0), space, threshold=-1.0)
    memory.observe(np.arange(1, 11))
    assert len(memory.lt_items) == 0 and memory.writes == 0 and memory.drift() == 0.0
    assert memory.retrieve().tolist() == [10, 9, 8, 7, 0, 0]  # the ST window, most recent first


def test_items_without_features_are_never_written():
    space = space_from_vectors([[1, 0], [0, 0], [0, 1]])
    memory = LocalMemory(MemoryConfig(st_window=3), space, threshold=0.1)
    memory.observe(np.array([1, 2, 3]))
    assert 2 not in memory.lt_items.tolist()


def test_prototypes_and_state_round_trip():
    space = axis_space(12)
    memory = LocalMemory(MemoryConfig(st_window=2, num_prototypes=3), space, threshold=0.5)
    memory.observe(np.arange(1, 13))
    centers = memory.prototypes(seed=0)  # orthogonal items: K-Means singletons are dropped (never an item verbatim)
    assert centers.shape[1] == 12 and 1 <= len(centers) <= 3
    assert (centers.max(axis=1) < 0.99).all()
    copy = LocalMemory(MemoryConfig(st_window=2, num_prototypes=3), space, threshold=0.0)
    copy.load_state_dict(memory.state_dict())
    assert copy.retrieve().tolist() == memory.retrieve().tolist()
    assert copy.threshold == 0.5 and copy.step == memory.step


def test_client_threshold_is_the_clients_own_quantile():
    space = space_from_vectors([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]] * 5)
    items = np.arange(1, 21)
    q90 = client_threshold(space, items, MemoryConfig(st_window=3, novelty_quantile=0.9))
    values = novelty(space, items, 0, 3)
    assert np.isclose(q90, np.quantile(values, 0.9))
    assert client_threshold(space, items, MemoryConfig(novelty_threshold=0.58)) == 0.58


class DenseSpace(ItemSpace):
    """The reference: every similarity read from one precomputed item x item matrix."""

    def __init__(self, visual, text):
        super().__init__(visual, text)
        self.matrix = (self._table @ self._table.T).numpy()

    def similarity(self, rows, cols):
        return self.matrix[np.asarray(rows)[:, None], np.asarray(cols)[None, :]]


def test_on_demand_similarities_make_the_memory_decisions_of_a_dense_matrix():
    """No item x item matrix is kept, yet every write, merge, eviction and retrieval is the one
    the dense matrix gives (clustered items, so merges and evictions happen)."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(12, 24, generator=generator)
    table = centers[torch.randint(0, 12, (600,), generator=generator)] + 0.35 * torch.randn(600, 24, generator=generator)
    table[0] = 0
    rng = np.random.default_rng(0)
    config = MemoryConfig(st_window=20, lt_capacity=15, top_k=10)
    lazy, dense = ItemSpace(table, None), DenseSpace(table, None)
    for _ in range(20):
        history = rng.integers(1, 600, int(rng.integers(30, 700)))
        threshold = client_threshold(lazy, history, config)
        assert np.isclose(threshold, client_threshold(dense, history, config))
        memories = [LocalMemory(config, space, threshold) for space in (lazy, dense)]
        for memory in memories:
            memory.observe(history[:len(history) // 2])
            memory.observe(history[len(history) // 2:])
        states = [memory.state_dict() for memory in memories]
        assert all(np.array_equal(states[0][k], states[1][k]) for k in ("recent", "lt_items", "lt_freq", "lt_last"))
        assert np.array_equal(memories[0].retrieve(), memories[1].retrieve())
    assert not hasattr(lazy, "matrix") and not hasattr(lazy, "similarity_matrix")


def test_an_item_is_written_only_if_its_novelty_exceeds_the_threshold():
    """Strictly above: items orthogonal to the window (novelty exactly 1) stay out at threshold 1,
    an item pointing away from the window (novelty 1.6) goes in. A fixed threshold of 0 is a
    threshold, not "use the client's quantile"."""
    space = space_from_vectors([[1, 0], [0, 1], [-0.6, -0.8]])
    memory = LocalMemory(MemoryConfig(st_window=5), space, threshold=1.0)
    memory.observe(np.array([1, 2, 3]))
    assert np.allclose(novelty(space, np.array([1, 2, 3]), 0, 5), [1.0, 1.0, 1.6])
    assert memory.lt_items.tolist() == [3]
    assert client_threshold(space, np.array([1, 2, 3]), MemoryConfig(novelty_threshold=0.0)) == 0.0


def test_utility_is_the_weighted_recency_half_life_and_relative_frequency():
    """utility = w * 0.5 ** (age / half_life) + (1 - w) * frequency / max frequency."""
    memory = LocalMemory(MemoryConfig(recency_half_life=100.0, recency_weight=0.6), axis_space(3), threshold=0.5)
    memory.lt_items, memory.lt_freq, memory.lt_last = np.array([1, 2]), np.array([1.0, 4.0]), np.array([0.0, 150.0])
    expected = [0.6 * 0.5 ** 2.0 + 0.4 * 0.25, 0.6 * 0.5 ** 0.5 + 0.4 * 1.0]
    assert np.allclose(memory.utility(200.0), expected)


def test_retrieval_with_a_featureless_recent_window_ranks_long_term_entries_by_their_centroid():
    """When no recent item has features, long-term entries are ranked by similarity to the
    long-term centroid (nothing from the short-term window can be retrieved)."""
    space = space_from_vectors([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 0]])  # item 3 has no features
    config = MemoryConfig(st_window=2, top_k=4, duplicate_threshold=0.99)
    memory = LocalMemory(config, space, threshold=0.0)
    memory.observe(np.array([1, 2, 3, 3]))
    assert memory.lt_items.tolist() == [1, 2] and memory.recent.tolist() == [3, 3]
    assert memory.retrieve().tolist() == [2, 1, 0, 0]  # centroid (0.8, 0.4, 0): item 2 is closer
