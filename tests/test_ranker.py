"""The ranker model: item lookups per representation, history aggregations, interaction, gradients."""
import pytest
import torch

from components.ranker import parameterization
from components.ranker.examples import AGE_BUCKETS
from components.ranker.model import Bypass, Gram, History, ItemLookup, Ranker, hash_rows

K, L, T, D = 16, 3, 5, 8


def config(item_ids="semid", history_ids="semid", aggregation="transformer", **kw) -> dict:
    return {"item_ids": item_ids, "parameterization": kw.get("parameterization", "prefix_ngram"),
            "ngram_depth": 3, "codebook_size": K, "levels": L, "embedding_dim": D,
            "rows": {"ie": 11, "rh": 7, "semid": 50, "hybrid": 100}, "vocabulary_size": 10, "dense_features": 2,
            "dense_columns": ["f_a", "f_b"], "dense_hidden": [4], "top_hidden": [8], "history_length": T,
            "history": {"item_ids": history_ids, "aggregation": aggregation, "seeds": 4, "heads": 2}}


def batch(B=6, seed=0) -> dict[str, torch.Tensor]:
    """Items 100-109, each with its own codes wherever it appears (as from one SemID store)."""
    g = torch.Generator().manual_seed(seed)
    item_codes = torch.randint(0, K, (10, L), generator=g)
    hist_item = torch.randint(100, 110, (B, T), generator=g)
    hist_item[:, :2] = -1  # left padding
    hist_codes = torch.where(hist_item[..., None] < 0, -1, item_codes[hist_item.clamp_min(100) - 100])
    item_id = torch.randint(100, 110, (B,), generator=g)
    return {"label": torch.randint(0, 2, (B,), generator=g).float(), "dense": torch.randn(B, 2, generator=g),
            "item_id": item_id, "codes": item_codes[item_id - 100], "hist_item": hist_item, "hist_codes": hist_codes,
            "hist_age": torch.where(hist_item < 0, 0, torch.randint(1, AGE_BUCKETS, (B, T), generator=g))}


def test_semid_rows_are_the_shared_parameterization_and_missing_codes_fall_back_to_rh():
    lookup = ItemLookup("semid", D, rows=50, codebook_size=K, parameterization="prefix_ngram", ngram_depth=3)
    codes = torch.tensor([[1, 2, 3], [1, 2, 4], [-1, -1, -1]])
    item = torch.tensor([5, 6, 7])
    rows = lookup.row_indices(item, codes)
    assert torch.equal(rows[:2], parameterization.row_indices(codes[:2], "prefix_ngram", K, 50, 3))
    assert rows[0, 0] == rows[1, 0] and rows[0, 1] == rows[1, 1] and rows[0, 2] != rows[1, 2]  # shared prefix
    assert rows[2].tolist() == [hash_rows(item[2:], 50).item(), 50, 50]  # rh row, then the padding row


def test_hybrid_rows_are_the_semid_rows_then_the_rh_row_each_in_its_own_half():
    lookup = ItemLookup("hybrid", D, rows=100, codebook_size=K, parameterization="prefix_ngram", ngram_depth=3)
    codes = torch.tensor([[1, 2, 3], [1, 2, 3], [-1, -1, -1]])
    item = torch.tensor([5, 6, 7])
    rows = lookup.row_indices(item, codes)
    assert torch.equal(rows[:2, :3], parameterization.row_indices(codes[:2], "prefix_ngram", K, 50, 3))
    assert rows[:, 3].tolist() == (50 + hash_rows(item, 50)).tolist()
    assert rows[0, 3] != rows[1, 3]  # exact copies: the same SemID rows, their own raw-ID rows
    assert rows[2, :3].tolist() == [100, 100, 100]  # no SemID: the raw-ID row alone


def test_ie_gives_every_known_id_its_row_and_unknown_ids_one_untrained_row():
    vocabulary = torch.tensor([10, 20, 30])
    lookup = ItemLookup("ie", D, rows=4, vocabulary=vocabulary)
    rows = lookup.row_indices(torch.tensor([20, 10, 30, 99, 5, -1]), torch.empty(6, 0, dtype=torch.int64))
    assert rows[:, 0].tolist() == [1, 0, 2, 3, 3, 4]  # 3: the unknown row; 4: padding


def test_rh_rows_are_deterministic_and_inside_the_table():
    ids = torch.arange(0, 100_000, 7, dtype=torch.int64) * 1_000_003
    rows = hash_rows(ids, 97)
    assert rows.min() >= 0 and rows.max() < 97
    assert torch.equal(rows, hash_rows(ids.clone(), 97))
    counts = torch.bincount(rows, minlength=97).float()
    assert counts.std() / counts.mean() < 0.1  # spread evenly


def test_padding_row_is_zero_and_never_trained():
    lookup = ItemLookup("rh", D, rows=7)
    rows, index = lookup(torch.tensor([-1, 3]), torch.empty(2, 0, dtype=torch.int64))
    out = rows[index]
    assert torch.all(out[0] == 0)
    out.sum().backward()
    grad = lookup.table.weight.grad.to_dense()
    assert torch.all(grad[7] == 0) and grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["semid", "hybrid", "rh", "ie"])
def test_each_distinct_item_is_pooled_once_and_gathered_back_to_every_position(kind):
    torch.manual_seed(0)
    lookup = ItemLookup(kind, D, rows=50, codebook_size=K, parameterization="prefix_ngram", ngram_depth=3,
                        vocabulary=torch.arange(100, 106))
    b = batch(B=8)
    ids, codes = b["hist_item"].flatten(), b["hist_codes"].flatten(0, 1)
    rows, index = lookup(ids, codes)
    assert len(rows) == len(ids.unique()) < len(ids)  # 40 positions, at most 11 distinct items (padding included)
    assert torch.allclose(rows[index], lookup.table(lookup.row_indices(ids, codes)))  # each position's own row sum


def test_gram_backward_is_autograds():
    V = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(Gram.apply, (V,))
    dZ = torch.randn(3, 5, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad(Gram.apply(V), V, dZ)
    (autograds,) = torch.autograd.grad(V @ V.transpose(1, 2), V, dZ)
    assert torch.allclose(ours, autograds)


def test_bypass_on_distinct_rows_is_x_w():
    torch.manual_seed(0)
    bypass = Bypass(D, T)
    items, ages = torch.randn(4, D), torch.randn(AGE_BUCKETS, D)
    history = History(items, torch.randint(0, 4, (3, T)), ages, torch.randint(0, AGE_BUCKETS, (3, T)))
    X = items[history.item_index] + ages[history.age_index]  # (3, T, D)
    Y, _ = bypass(history)
    assert torch.allclose(Y, X @ bypass.W.weight.T, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["bypass", "transformer", "pma"])
def test_forward_shapes_attention_rows_and_sparse_gradients(aggregation):
    torch.manual_seed(0)
    model = Ranker(config(aggregation=aggregation))
    b = batch()
    logits, A = model(b)
    assert logits.shape == (6,) and torch.isfinite(logits).all()
    if aggregation == "bypass":
        assert A is None
    else:
        queries = 4 if aggregation == "pma" else T
        assert A.shape == (6, 2, queries, T)
        assert torch.allclose(A.sum(-1), torch.ones(()), atol=1e-5)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, b["label"]).backward()
    for table in model.sparse_parameters():
        assert table.grad.is_sparse
    assert all(p.grad is not None for p in model.dense_parameters() if p.requires_grad)


def test_history_lookup_can_differ_from_the_target_item_lookup():
    model = Ranker(config(item_ids="rh", history_ids="semid"))
    assert set(model.lookups) == {"rh", "semid"}
    logits, _ = model(batch())
    assert logits.shape == (6,)


def test_exact_copies_get_the_same_prediction_with_semid_but_not_with_rh():
    """Invariance: two raw IDs with the same SemID are the same item to a SemID ranker."""
    torch.manual_seed(0)
    b = batch(B=1)
    copy = {k: v.clone() for k, v in b.items()}
    copy["item_id"] += 1_000
    semid = Ranker(config(item_ids="semid")).eval()
    assert torch.equal(semid(b)[0], semid(copy)[0])
    for kind in ("rh", "hybrid"):
        other = Ranker(config(item_ids=kind)).eval()
        assert not torch.equal(other(b)[0], other(copy)[0])
