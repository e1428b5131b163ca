"""Token parameterizations: SemID codes (c_1..c_L, 0-indexed, each < K) -> embedding-table rows.

Each item yields G row indices; the item embedding is the sum of those rows. Formulas from PAPER.md,
vectorized over a batch of codes (B, L); every index is finally taken modulo the table size H:

    unigram        [(l-1) K + c_l                              for l = 1..L]       G = L
    trigram        [K^2 c_1 + K c_2 + c_3]                                         G = 1
    fourgram       [K^3 c_1 + K^2 c_2 + K c_3 + c_4]                               G = 1
    all_bigrams    [K^2 (i-1) + K c_i + c_{i+1}                for i = 1..L-1]     G = L - 1
    prefix_ngram   [sum_{t=1..i} K^(i-t) (c_t + 1) - 1         for i = 1..n]       G = n

The +1 in prefix_ngram gives every prefix length its own index range (length 1: [0, K-1], length 2:
[K, K^2+K-1], ...), so prefix (5) never meets prefix (0, 5) before the modulo. The sums are built with
Horner's rule modulo H, so K^n may exceed int64 (K = 2048, n = 6) as long as H * K does not.
"""
from __future__ import annotations

import torch

NAMES = ("unigram", "trigram", "fourgram", "all_bigrams", "prefix_ngram")


def unigram(c: torch.Tensor, K: int, H: int) -> torch.Tensor:
    L = c.shape[1]
    level = torch.arange(L, device=c.device)
    return (level * K + c) % H  # (B, L)


def ngram(c: torch.Tensor, K: int, H: int) -> torch.Tensor:
    """One row per item from all of its codes: trigram for L = 3 codes, fourgram for L = 4."""
    index = torch.zeros(c.shape[0], dtype=torch.int64, device=c.device)
    for t in range(c.shape[1]):
        index = (index * K + c[:, t]) % H
    return index[:, None]  # (B, 1)


def all_bigrams(c: torch.Tensor, K: int, H: int) -> torch.Tensor:
    i = torch.arange(c.shape[1] - 1, device=c.device)
    return (i * K * K + c[:, :-1] * K + c[:, 1:]) % H  # (B, L-1)


def prefix_ngram(c: torch.Tensor, K: int, H: int, n: int) -> torch.Tensor:
    s = torch.zeros(c.shape[0], dtype=torch.int64, device=c.device)  # sum_{t<=i} K^(i-t) (c_t + 1), mod H
    rows = []
    for t in range(n):
        s = (s * K + c[:, t] + 1) % H
        rows.append((s - 1) % H)
    return torch.stack(rows, dim=1)  # (B, n)


def row_indices(codes: torch.Tensor, name: str, K: int, H: int, n: int | None = None) -> torch.Tensor:
    """Rows (B, G) of a table of H rows for codes (B, L) under parameterization `name`."""
    c = codes.to(torch.int64)
    L = c.shape[1]
    if H * K >= 2**63:
        raise ValueError(f"table size H={H} times K={K} overflows int64")
    if name == "unigram":
        return unigram(c, K, H)
    if name == "trigram":
        if L < 3:
            raise ValueError(f"trigram needs L >= 3 code levels, got L={L}")
        return ngram(c[:, :3], K, H)
    if name == "fourgram":
        if L < 4:
            raise ValueError(f"fourgram needs L >= 4 code levels, got L={L}")
        return ngram(c[:, :4], K, H)
    if name == "all_bigrams":
        if L < 2:
            raise ValueError(f"all_bigrams needs L >= 2 code levels, got L={L}")
        return all_bigrams(c, K, H)
    if name == "prefix_ngram":
        n = L if n is None else n
        if not 1 <= n <= L:
            raise ValueError(f"prefix_ngram depth n={n} must be in 1..L={L}")
        return prefix_ngram(c, K, H, n)
    raise ValueError(f"unknown parameterization {name!r}; expected one of {', '.join(NAMES)}")


def id_space(name: str, K: int, L: int, n: int | None = None) -> int:
    """How many distinct rows the parameterization addresses before the modulo (a Python int, unbounded)."""
    if name == "unigram":
        return L * K
    if name == "trigram":
        return K**3
    if name == "fourgram":
        return K**4
    if name == "all_bigrams":
        return (L - 1) * K * K
    if name == "prefix_ngram":
        return sum(K**i for i in range(1, (L if n is None else n) + 1))
    raise ValueError(f"unknown parameterization {name!r}; expected one of {', '.join(NAMES)}")
