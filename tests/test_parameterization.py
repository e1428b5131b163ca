"""Token parameterizations: exact formulas from PAPER.md and the prefix properties the method relies on."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.ranker.parameterization import id_space, row_indices

BIG = 2**40  # a table larger than every ID space below: no modulo in effect


def codes(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_formulas_on_a_hand_computed_example():
    K, c = 10, codes([1, 2, 3, 4])
    assert row_indices(c, "unigram", K, BIG).tolist() == [[1, 12, 23, 34]]
    assert row_indices(c, "trigram", K, BIG).tolist() == [[123]]
    assert row_indices(c, "fourgram", K, BIG).tolist() == [[1234]]
    assert row_indices(c, "all_bigrams", K, BIG).tolist() == [[12, 123, 234]]
    # prefix: (1+1) - 1 = 1; 10*2 + 3 - 1 = 22; 100*2 + 10*3 + 4 - 1 = 233; 2000 + 300 + 40 + 5 - 1
    assert row_indices(c, "prefix_ngram", K, BIG).tolist() == [[1, 22, 233, 2344]]
    assert row_indices(c, "prefix_ngram", K, BIG, n=2).tolist() == [[1, 22]]


def test_prefix_ranges_are_disjoint_per_length():
    K = 7
    c = codes(*itertools.product(range(K), repeat=3))
    rows = row_indices(c, "prefix_ngram", K, BIG)
    for i, (lo, hi) in enumerate([(0, K - 1), (K, K**2 + K - 1), (K**2 + K, K**3 + K**2 + K - 1)]):
        assert rows[:, i].min().item() == lo and rows[:, i].max().item() == hi


def test_modulo_keeps_every_index_in_the_table():
    c = torch.randint(0, 2048, (1000, 6), generator=torch.Generator().manual_seed(0))
    H = 50_000_000
    for name in ("unigram", "trigram", "fourgram", "all_bigrams", "prefix_ngram"):
        rows = row_indices(c, name, 2048, H)
        assert rows.min() >= 0 and rows.max() < H
    exact = row_indices(c[:, :3], "prefix_ngram", 2048, BIG)
    assert torch.equal(row_indices(c[:, :3], "prefix_ngram", 2048, 1_000_003), exact % 1_000_003)


def test_id_space_counts_the_rows_addressed():
    assert id_space("prefix_ngram", 2048, 3) == 2048 + 2048**2 + 2048**3
    assert id_space("unigram", 256, 3) == 768
    assert id_space("all_bigrams", 256, 3) == 2 * 256**2


@pytest.mark.parametrize("name,L", [("trigram", 2), ("fourgram", 3), ("nonsense", 3)])
def test_bad_requests_are_clear_errors(name, L):
    with pytest.raises(ValueError, match=name):
        row_indices(torch.zeros((2, L), dtype=torch.int64), name, 8, BIG)


K_L_CODES = st.integers(2, 12).flatmap(lambda K: st.integers(1, 4).flatmap(lambda L: st.tuples(
    st.just(K), st.just(L), st.lists(st.lists(st.integers(0, K - 1), min_size=L, max_size=L),
                                      min_size=2, max_size=40))))


@settings(max_examples=200, deadline=None)
@given(K_L_CODES)
def test_prefix_ngram_never_collides_across_prefix_lengths(args):
    K, L, rows = args
    idx = row_indices(codes(*rows), "prefix_ngram", K, BIG)
    row_of_prefix = {}
    for code, r in zip(rows, idx.tolist()):
        for i in range(L):
            row_of_prefix.setdefault(tuple(code[: i + 1]), set()).add(r[i])
    assert all(len(v) == 1 for v in row_of_prefix.values())  # a prefix always maps to one row ...
    flat = [next(iter(v)) for v in row_of_prefix.values()]
    assert len(set(flat)) == len(flat)  # ... and distinct prefixes, of any lengths, to distinct rows


@settings(max_examples=200, deadline=None)
@given(K_L_CODES)
def test_two_items_share_the_level_i_row_iff_they_share_the_length_i_prefix(args):
    K, L, rows = args
    idx = row_indices(codes(*rows), "prefix_ngram", K, BIG).tolist()
    for a, b in itertools.combinations(range(len(rows)), 2):
        for i in range(L):
            assert (idx[a][i] == idx[b][i]) == (rows[a][: i + 1] == rows[b][: i + 1])
