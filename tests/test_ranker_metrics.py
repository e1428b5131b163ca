"""Unit tests of components/ranker/metrics.py: hand-computed examples, no disk."""
import json
import math

import numpy as np
import pytest

from components.ranker.metrics import (
    SEGMENTS,
    aar,
    attention_diagnostics,
    drift_sensitivity,
    impression_segments,
    log_loss,
    ne_by_segment,
    normalized_entropy,
    aar_terms,
    bootstrap_drift_contrast,
    bootstrap_mean_contrast,
    bootstrap_ne_contrast,
    segment_masks,
)

# --- log loss and NE ---

def test_log_loss_by_hand():
    # rows: -ln 0.8, -ln(1 - 0.4) = -ln 0.6  ->  mean = -(ln 0.8 + ln 0.6) / 2
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)


def test_log_loss_clips_certain_wrong_predictions():
    assert log_loss(np.array([1]), np.array([0.0]), eps=1e-7) == pytest.approx(-math.log(1e-7))


def test_ne_by_hand():
    y = np.array([1, 0, 0, 0])
    p = np.array([0.5, 0.5, 0.25, 0.25])
    # model: rows -ln 0.5, -ln 0.5, -ln 0.75, -ln 0.75  ->  mean = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2 = 0.490415
    # base rate 0.25: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    # NE = 0.490415 / 0.562335 = 0.872104
    model = math.log(8 / 3) / 2
    base = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_entropy(y, p) == pytest.approx(model / base, rel=1e-9)
    assert normalized_entropy(y, p) == pytest.approx(0.872104, abs=1e-6)


def test_ne_symmetric_example_is_log2_of_five_quarters():
    # base rate 0.5 costs ln 2 per event; predicting 0.8 on clicks and 0.2 on non-clicks costs -ln 0.8,
    # so NE = -ln 0.8 / ln 2 = log2(1.25)
    assert normalized_entropy(np.array([1, 0, 1, 0]), np.array([0.8, 0.2, 0.8, 0.2])) == pytest.approx(
        math.log2(1.25), rel=1e-9)


def test_ne_of_the_base_rate_predictor_is_one():
    rng = np.random.default_rng(0)
    y = (rng.random(10_000) < 0.037).astype(np.int8)
    assert abs(normalized_entropy(y, np.full(y.size, y.mean())) - 1.0) < 1e-12


def test_ne_below_one_for_an_informative_predictor():
    rng = np.random.default_rng(1)
    ctr = rng.uniform(0.01, 0.3, 20_000)
    y = (rng.random(ctr.size) < ctr).astype(np.int8)
    assert normalized_entropy(y, ctr) < 0.98
    assert normalized_entropy(y, 1 - ctr) > 1.0  # an anti-informative one is worse than the base rate


@pytest.mark.parametrize("y, p, message", [
    ([0, 0, 0], [0.1, 0.2, 0.3], "found 0 clicks in 3 events"),
    ([1, 1], [0.1, 0.2], "found 2 clicks in 2 events"),
    ([], [], "expected at least one"),
    ([1, 0], [0.5], "found 2 labels and 1 predictions"),
    ([1, 0], [0.5, np.nan], "expected finite predictions, found nan at row 1"),
    ([1, 0], [0.5, np.inf], "expected finite predictions"),
    ([1, 0], [0.5, 1.5], "expected predictions in [0, 1], found 1.5 at row 1"),
    ([1, 2], [0.5, 0.5], "expected labels 0 or 1, found 2.0 at row 1"),
])
def test_ne_rejects_bad_input(y, p, message):
    with pytest.raises(ValueError, match="normalized_entropy") as info:
        normalized_entropy(np.array(y), np.array(p))
    assert message in str(info.value)


# --- segments ---

def impressions(counts: dict[int, int]) -> np.ndarray:
    return np.repeat(np.array(list(counts), dtype=np.int64), list(counts.values()))


def test_segments_by_hand():
    # 100 impressions; share before each item in sorted order: 1: 0, 2: .30, 3: .50, 4: .70, 5: .85, 6: .95
    # -> item 1 (30%) is head alone; 2, 3, 4 start before 75%: torso; 5, 6 tail. 2 and 3 tie: id order.
    ids = impressions({5: 10, 3: 20, 1: 30, 6: 5, 2: 20, 4: 15})
    rng = np.random.default_rng(0)
    seg = impression_segments(rng.permutation(ids))
    assert seg.to_dicts() == [
        {"item_id": 1, "impressions": 30, "segment": "head"},
        {"item_id": 2, "impressions": 20, "segment": "torso"},
        {"item_id": 3, "impressions": 20, "segment": "torso"},
        {"item_id": 4, "impressions": 15, "segment": "torso"},
        {"item_id": 5, "impressions": 10, "segment": "tail"},
        {"item_id": 6, "impressions": 5, "segment": "tail"},
    ]


def test_segment_boundaries_are_strict():
    # four equal items: shares before are 0, .25, .50, .75 -> head, torso (.25 is not < .25), torso, tail
    seg = impression_segments(impressions({4: 25, 3: 25, 2: 25, 1: 25}))
    assert seg["item_id"].to_list() == [1, 2, 3, 4]
    assert seg["segment"].to_list() == ["head", "torso", "torso", "tail"]


def test_segments_of_no_impressions_is_empty():
    seg = impression_segments(np.array([], dtype=np.int64))
    assert seg.height == 0 and seg.columns == ["item_id", "impressions", "segment"]


def test_segment_masks():
    seg = impression_segments(impressions({1: 30, 2: 20, 3: 20, 4: 15, 5: 10, 6: 5}))
    eval_ids = np.array([6, 1, 99, 3, 1, 7, 5])
    masks = segment_masks(eval_ids, seg, new_item_ids=np.array([7, 42]))  # 99: unseen, created before
    assert list(masks) == list(SEGMENTS)
    as_lists = {name: m.astype(int).tolist() for name, m in masks.items()}
    assert as_lists == {
        "all":   [1, 1, 1, 1, 1, 1, 1],
        "head":  [0, 1, 0, 0, 1, 0, 0],
        "torso": [0, 0, 0, 1, 0, 0, 0],
        "tail":  [1, 0, 0, 0, 0, 0, 1],
        "seen":  [1, 1, 0, 1, 1, 0, 1],
        "unseen": [0, 0, 1, 0, 0, 1, 0],
        "new":   [0, 0, 0, 0, 0, 1, 0],
    }


def test_segment_masks_without_training_items_are_all_unseen():
    masks = segment_masks(np.array([3, 4]), impression_segments(np.array([], dtype=np.int64)), np.array([4]))
    assert masks["unseen"].all() and not masks["seen"].any() and not masks["head"].any()
    assert masks["new"].tolist() == [False, True]


# --- NE by segment, drift ---

def test_ne_by_segment_counts_and_none():
    y = np.array([1, 0, 1, 0, 1, 1, 0, 0])
    p = np.array([0.8, 0.2, 0.8, 0.2, 0.6, 0.6, 0.3, 0.3])
    masks = {
        "all": np.ones(8, bool),
        "head": np.array([1, 1, 1, 1, 0, 0, 0, 0], bool),
        "tail": np.array([0, 0, 0, 0, 1, 1, 0, 0], bool),  # clicks only
        "new": np.zeros(8, bool),                            # no events
    }
    out = ne_by_segment(y, p, masks)
    assert out["head"] == {"ne": pytest.approx(math.log2(1.25)), "events": 4, "clicks": 2}
    assert out["tail"] == {"ne": None, "events": 2, "clicks": 2}
    assert out["new"] == {"ne": None, "events": 0, "clicks": 0}
    assert out["all"]["ne"] == pytest.approx(normalized_entropy(y, p))
    json.dumps(out, allow_nan=False)  # valid JSON: no NaN anywhere


def test_ne_by_segment_rejects_a_mask_of_the_wrong_length():
    with pytest.raises(ValueError, match="'head' mask"):
        ne_by_segment(np.array([1, 0]), np.array([0.5, 0.5]), {"head": np.ones(3, bool)})


def test_drift_sensitivity_subtracts_late_from_early_and_keeps_none():
    early = {"all": {"ne": 0.95}, "head": {"ne": 0.90}, "tail": {"ne": None}, "new": {"ne": 0.99}}
    late = {"all": {"ne": 0.94}, "head": {"ne": None}, "tail": {"ne": 0.97}, "new": {"ne": 0.97}}
    out = drift_sensitivity(early, late)
    assert out == {"all": pytest.approx(0.01), "head": None, "tail": None, "new": pytest.approx(0.02)}
    assert list(out) == ["all", "head", "tail", "new"]


def test_drift_sensitivity_of_a_segment_missing_on_one_side_is_none():
    assert drift_sensitivity({"all": {"ne": 0.9}, "seen": {"ne": 0.9}}, {"all": {"ne": 0.8}}) == {
        "all": pytest.approx(0.1), "seen": None}


# --- AAR ---

def test_aar_by_hand():
    # pairs: (0.1, 0.1) -> 0; (0.2, 0.1) -> 2 * 0.1 / 0.3 = 2/3; mean = 1/3
    assert aar(np.array([0.1, 0.2]), np.array([0.1, 0.1]), eps=0.0) == pytest.approx(1 / 3)
    assert aar(np.array([0.0]), np.array([0.0])) == 0.0  # eps keeps 0/0 away


@pytest.mark.parametrize("p1, p2", [([], []), ([0.1], [0.1, 0.2]), ([np.nan], [0.1])])
def test_aar_rejects_bad_input(p1, p2):
    with pytest.raises(ValueError, match="aar: expected"):
        aar(np.array(p1), np.array(p2))


# --- attention diagnostics ---

def test_uniform_attention():
    B, heads, T, S = 2, 3, 4, 8
    attn = np.full((B, heads, T, S), 1 / S)
    pad = np.zeros((B, S), bool)
    pad[0, :2] = True  # 2 of 8 keys padded in row 0, none in row 1: mass (2/8 + 0) / 2
    d = attention_diagnostics(attn, pad)
    assert d == pytest.approx({"first_token": 1 / S, "padding_mass": 0.125, "entropy": math.log2(S),
                               "self_attention": 1 / S})


def test_one_hot_attention_on_the_first_key():
    B, T, S = 2, 5, 3
    attn = np.zeros((B, T, S))
    attn[..., 0] = 1.0
    pad = np.zeros((B, S), bool)
    pad[:, 0] = True
    d = attention_diagnostics(attn, pad)
    # a_{i,i} over i < min(T, S) = 3: 1, 0, 0 -> 1/3
    assert d == {"first_token": 1.0, "padding_mass": 1.0, "entropy": 0.0, "self_attention": pytest.approx(1 / 3)}


def test_attention_with_or_without_a_heads_axis_agrees():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 6))
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    pad = rng.random((3, 6)) < 0.3
    assert attention_diagnostics(attn, pad) == pytest.approx(attention_diagnostics(attn[:, None], pad))


def test_attention_rejects_mismatched_padding():
    with pytest.raises(ValueError, match=r"found attn \(2, 4, 6\) and pad \(2, 5\)"):
        attention_diagnostics(np.zeros((2, 4, 6)), np.zeros((2, 5), bool))


def test_paired_bootstrap_point_is_the_ne_difference_and_identical_models_differ_by_zero():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.2).astype(float)
    users = rng.integers(0, 100, 2000)
    p_a, p_b = np.clip(0.2 + 0.3 * (y - 0.2) + rng.normal(0, 0.05, 2000), 0.01, 0.99), np.full(2000, 0.2)
    found = bootstrap_ne_contrast(y, [(1, p_a), (-1, p_b)], users, resamples=300)
    assert found["difference"] == pytest.approx(normalized_entropy(y, p_a) - normalized_entropy(y, p_b), abs=1e-9)
    assert found["low"] <= found["difference"] <= found["high"] < 0  # a, the informative one, is better
    same = bootstrap_ne_contrast(y, [(1, p_a), (-1, p_a)], users, resamples=300)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}


def test_paired_bootstrap_resamples_users_so_one_heavy_user_cannot_decide():
    """Model a is much better on one heavy user's 1,000 impressions and a little worse on 30 users' 20 each:
    a is better overall, but without the heavy user it is worse, so the interval over users spans 0 while
    one over impressions (every impression its own user) would not."""
    y_heavy = np.tile([1.0, 0.0, 0.0, 0.0], 250)
    y_light = np.tile([1.0, 0.0, 0.0, 0.0, 0.0], 120)
    y = np.concatenate([y_heavy, y_light])
    p_a = np.concatenate([np.where(y_heavy == 1, 0.6, 0.1), np.full(600, 0.3)])
    p_b = np.concatenate([np.full(1000, 0.25), np.full(600, 0.2)])
    users = np.concatenate([np.zeros(1000), 1 + np.arange(600) // 20])
    by_user = bootstrap_ne_contrast(y, [(1, p_a), (-1, p_b)], users, resamples=2000)
    by_impression = bootstrap_ne_contrast(y, [(1, p_a), (-1, p_b)], np.arange(1600), resamples=2000)
    assert by_user["difference"] == pytest.approx(by_impression["difference"], abs=1e-12)
    assert by_user["difference"] < 0
    assert by_user["low"] < 0 < by_user["high"]
    assert by_impression["high"] < 0
    assert bootstrap_ne_contrast(y, [(1, p_a), (-1, p_b)], users, resamples=2000) == by_user  # seeded


def test_paired_bootstrap_rejects_users_of_another_length():
    with pytest.raises(ValueError, match="expected one user per impression"):
        bootstrap_ne_contrast(np.array([0.0, 1.0]), [(1, np.array([0.2, 0.8])), (-1, np.array([0.5, 0.5]))],
                              np.array([1]))


def test_bootstrap_of_drift_sensitivity_is_the_difference_of_the_slices_differences():
    rng = np.random.default_rng(1)
    slices = []
    for informative in (0.3, 0.0):  # a is better than b early, equal late: a drifts more (larger early - late)
        y = (rng.random(3000) < 0.2).astype(float)
        p_b = np.full(3000, 0.2)
        p_a = np.clip(0.2 + informative * (y - 0.2) + rng.normal(0, 0.02, 3000), 0.01, 0.99)
        slices.append((y, p_a, p_b, rng.integers(0, 200, 3000)))
    (ye, ae, be, _), (yl, al, bl, _) = slices
    expected = ((normalized_entropy(ye, ae) - normalized_entropy(yl, al))
                - (normalized_entropy(ye, be) - normalized_entropy(yl, bl)))
    found = bootstrap_drift_contrast(*[(y, [(1, a), (-1, b)], u) for y, a, b, u in slices], resamples=300)
    assert found["difference"] == pytest.approx(expected, abs=1e-9)
    assert found["high"] < 0  # a's early NE is lower, so a's drift sensitivity is lower by a clear margin


def test_bootstrap_mean_contrast_by_hand():
    a, b = np.array([0.2, 0.2, 0.4, 0.4]), np.array([0.1, 0.1, 0.1, 0.1])
    found = bootstrap_mean_contrast([(1, a), (-1, b)], users=np.array([1, 1, 2, 2]), resamples=500)
    assert found["difference"] == pytest.approx(0.2)
    assert found["low"] == pytest.approx(0.1) and found["high"] == pytest.approx(0.3)  # all user 1 .. all user 2
    assert aar_terms([0.1, 0.3], [0.1, 0.1]).tolist() == pytest.approx([0.0, 2 * 0.2 / (0.4 + 1e-6)])


def test_a_four_model_contrast_is_the_difference_of_differences():
    rng = np.random.default_rng(2)
    y = (rng.random(2000) < 0.3).astype(float)
    users = rng.integers(0, 150, 2000)
    p = [np.clip(0.3 + k * 0.1 * (y - 0.3) + rng.normal(0, 0.03, 2000), 0.01, 0.99) for k in range(4)]
    found = bootstrap_ne_contrast(y, [(1, p[3]), (-1, p[2]), (-1, p[1]), (1, p[0])], users, resamples=200)
    ne = [normalized_entropy(y, q) for q in p]
    assert found["difference"] == pytest.approx((ne[3] - ne[2]) - (ne[1] - ne[0]), abs=1e-9)
    assert found["low"] <= found["difference"] <= found["high"]
