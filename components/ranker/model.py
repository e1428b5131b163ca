"""The DLRM-style ranker of PAPER.md, section Ranker: which items a user clicks, from item IDs, dense features
and the user's click history.

    x_d = MLP_dense((f - mean) / std)                                   (B, d)    dense module
    x_i = sum_g E[row_g(item)]                                          (B, d)    sparse module, sum-pooled
    X   = [sum_g E'[row_g(h_t)] + A[age_t]  for t = 1..T]               (B, T, d) user history, oldest first
    Y   = aggregate(X): bypass X W | transformer block | PMA block      (B, m, d)
    z   = [x_d . x_i, x_d . Y_j, x_i . Y_j, Y_j . Y_k  (all pairs)]     (B, n(n-1)/2), n = 2 + m
    p   = sigmoid(MLP_top([x_d, z]) + w . (f - mean) / std)             click probability, trained with BCE

The linear term w (zero at the start) lets a calibrated dense feature - the user's past click rate above all -
act on the logit from the first steps; through MLP_dense and MLP_top alone the 60 steps of one pass over two
years of the MovieLens sample did not learn it (NE on all items 1.08 without it, 0.94 with it, at lr 0.01).

Item rows (ItemLookup), for `item_ids`:
    ie     one row per raw ID known when the model is built; an ID first seen in evaluation has a row that was
           never trained (as in the paper), an ID unknown to the model one shared untrained row
    rh     h(raw ID) mod H, a multiplicative hash
    semid  the SemID codes through a token parameterization (components/ranker/parameterization.py), mod H
    hybrid the semid rows plus the item's rh row, from a table of 2H rows (semid in [0, H), rh in [H, 2H)):
           SemID features next to the raw-ID feature, as the paper's production model added them
H = ceil(training items / collision_factor) for rh, semid and each half of hybrid. An item without a SemID falls
back to its rh row.

Transformer block (T queries) and PMA block (d_s learned seed queries), positional embeddings P added first:
    X1 = Attn(Q = LN(S or X + P), K = V = LN(X + P)) + (S or X + P);  X2 = MLP(LN(X1)) + X1
Padding positions are a learned token (age bucket 0, no item row) and are not masked out: the attention
diagnostics measure how much attention goes to padding, as in the paper.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from components.layers import mlp
from components.ranker import parameterization
from components.ranker.examples import AGE_BUCKETS

HASH_PRIME = 2**31 - 1  # rh: h(id) = ((id mod P) * HASH_MULTIPLIER mod P) mod H, a universal-family member
HASH_MULTIPLIER = 1_103_515_245


def hash_rows(item_id: torch.Tensor, H: int) -> torch.Tensor:
    return (item_id % HASH_PRIME) * HASH_MULTIPLIER % HASH_PRIME % H


class ItemLookup(nn.Module):
    """Raw item IDs (+ SemID codes) -> sum of G embedding rows. Row `rows` of the table is the padding row:
    zero and never trained (EmbeddingBag's padding_idx, or left out of TorchRec's jagged input), used for history
    padding and unused slots. `fused_lr` set: the table is TorchRec's FusedEmbeddingBagCollection, whose
    row-wise Adagrad at that rate updates the rows a batch touched during backward (ranker.tables: torchrec);
    else a torch EmbeddingBag with sparse gradients for the training loop's Adagrad. `equal_bags`: the table is
    sharded row-wise over workers (components/ranker/sharding.py), whose gloo collectives need every worker to
    pool as many bags: this one pads its bags with empty ones up to the largest count."""

    def __init__(self, kind: str, d: int, rows: int, codebook_size: int = 0, parameterization: str = "",
                 ngram_depth: int | None = None, vocabulary: torch.Tensor | None = None,
                 fused_lr: float | None = None):
        super().__init__()
        self.kind, self.rows, self.K = kind, rows, codebook_size
        self.parameterization, self.ngram_depth = parameterization, ngram_depth
        self.equal_bags = False
        # ie: sorted raw IDs; row i belongs to vocabulary[i], row len(vocabulary) to every unknown ID
        self.register_buffer("vocabulary", vocabulary if vocabulary is not None else torch.empty(0, dtype=torch.int64))
        if fused_lr is None:
            self.table = nn.EmbeddingBag(rows + 1, d, mode="sum", sparse=True, padding_idx=rows)
        else:
            self.table = fused_table(kind, rows + 1, d, fused_lr)
        bound = (rows + 1) ** -0.5  # DLRM's init: a row never trained stays near zero instead of adding noise
        with torch.no_grad():
            nn.init.uniform_(self.weight, -bound, bound)
            self.weight[rows].zero_()

    @property
    def fused(self) -> bool:
        return not isinstance(self.table, nn.EmbeddingBag)

    @property
    def weight(self) -> nn.Parameter:
        return self.table.weight if not self.fused else self.table.embedding_bags[self.kind].weight

    def row_indices(self, item_id: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(B,) raw IDs (-1: padding) and (B, L) codes (-1: no SemID) -> (B, G) table rows."""
        pad = item_id < 0
        if self.kind == "ie":
            i = torch.searchsorted(self.vocabulary, item_id).clamp_max(len(self.vocabulary) - 1)
            known = self.vocabulary[i] == item_id
            rows = torch.where(known, i, len(self.vocabulary))[:, None]  # (B, 1)
        elif self.kind == "rh":
            rows = hash_rows(item_id, self.rows)[:, None]  # (B, 1)
        else:
            H = self.rows if self.kind == "semid" else self.rows // 2
            rows = parameterization.row_indices(codes.clamp_min(0), self.parameterization, self.K, H,
                                                self.ngram_depth)  # (B, G)
            no_semid = (codes[:, 0] < 0)[:, None]
            fallback = torch.full_like(rows, self.rows)
            if self.kind == "semid":
                fallback[:, 0] = hash_rows(item_id, H)
            rows = torch.where(no_semid, fallback, rows)
            if self.kind == "hybrid":
                rows = torch.cat([rows, H + hash_rows(item_id, H)[:, None]], dim=1)  # (B, G + 1)
        return torch.where(pad[:, None], self.rows, rows)

    def forward(self, item_id: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) raw IDs and their (N, L) codes -> the row sums of the distinct items (U, d) and each ID's place
        among them (N,); `rows.index_select(0, index)` gives the (N, d) embeddings. A batch's histories repeat
        the same items many times over (one user's consecutive impressions share most of their history), so the
        table's forward, its sparse gradient and the optimizer's work shrink to the distinct items. An item's
        codes are the same wherever it appears (one SemID store), so any occurrence's codes stand for all."""
        unique, index = torch.unique(item_id, return_inverse=True)  # (U,), (N,)
        occurrence = torch.empty_like(unique).scatter_(0, index, torch.arange(len(item_id), device=item_id.device))
        return self.pool(self.row_indices(unique, codes[occurrence])), index

    def pool(self, rows: torch.Tensor) -> torch.Tensor:
        """(U, G) table rows -> (U, d) row sums."""
        if not self.fused:
            return self.table(rows)
        from torchrec import KeyedJaggedTensor

        bags = len(rows)
        if self.equal_bags:
            most = torch.tensor(bags)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            rows = F.pad(rows, (0, 0, 0, int(most) - bags), value=self.rows)
        used = rows != self.rows  # the padding row is left out: an all-padding bag pools to zero
        jagged = KeyedJaggedTensor.from_lengths_sync(keys=[self.kind], values=rows[used], lengths=used.sum(1))
        return self.table(jagged)[self.kind][:bags]


def fused_table(kind: str, rows: int, d: int, lr: float) -> nn.Module:
    """TorchRec's FusedEmbeddingBagCollection of one sum-pooled table, row-wise Adagrad fused into backward
    (FBGEMM's table-batched kernels; torchrec and fbgemm-gpu-cpu are installed without their CUDA wheels:
    README, "Installing by hand")."""
    import warnings

    from torchrec import EmbeddingBagConfig, PoolingType
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection
    from torchrec.optim import RowWiseAdagrad

    warnings.filterwarnings("ignore", message="is_fx_tracing will return true")  # torchrec's import-time note
    config = EmbeddingBagConfig(name=kind, embedding_dim=d, num_embeddings=rows, feature_names=[kind],
                                pooling=PoolingType.SUM)
    return FusedEmbeddingBagCollection([config], optimizer_type=RowWiseAdagrad, optimizer_kwargs={"lr": lr},
                                       device=torch.device("cpu"))


class Attention(nn.Module):
    """Multi-head attention written out, so the weights A (B, heads, Tq, S) can be returned for diagnostics."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, Tq, d = queries.shape
        S, h = keys.shape[1], self.heads
        q = self.q(queries).view(B, Tq, h, d // h).transpose(1, 2)  # (B, h, Tq, dh)
        k, v = self.kv(keys).view(B, S, 2, h, d // h).permute(2, 0, 3, 1, 4)  # (B, h, S, dh) each
        A = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)  # (B, h, Tq, S)
        y = (A @ v).transpose(1, 2).reshape(B, Tq, d)
        return self.out(y), A


class History(NamedTuple):
    """A batch's user histories as rows to gather, X[b, t] = items[item_index[b, t]] + ages[age_index[b, t]]:
    the distinct history items' row sums and the age-bucket table A, kept apart so that a map applied to each
    position alike (bypass) runs on the few distinct rows before the gather."""
    items: torch.Tensor       # (U, d)
    item_index: torch.Tensor  # (B, T)
    ages: torch.Tensor        # (AGE_BUCKETS, d)
    age_index: torch.Tensor   # (B, T)

    def gather(self, items: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
        """(B, T, d): items[item_index] + ages[age_index], for these rows or their images under a linear map."""
        B, T = self.item_index.shape
        return (items.index_select(0, self.item_index.flatten())
                + ages.index_select(0, self.age_index.flatten())).view(B, T, -1)


class Bypass(nn.Module):
    """Y = X W: each history item projected, no mixing across positions. Computed as (E W)[h] + (A W)[age]:
    the product runs on the batch's distinct items and the age buckets instead of all B T positions."""

    def __init__(self, d: int, T: int):
        super().__init__()
        self.W = nn.Linear(d, d, bias=False)

    def forward(self, history: History) -> tuple[torch.Tensor, None]:
        return history.gather(self.W(history.items), self.W(history.ages)), None


class AttentionBlock(nn.Module):
    """Pre-LN transformer block over the history; with `seeds` the queries are learned seed vectors (PMA)."""

    def __init__(self, d: int, T: int, heads: int, seeds: int = 0):
        super().__init__()
        self.position = nn.Parameter(torch.randn(T, d) * 0.02)  # P
        self.seeds = nn.Parameter(torch.randn(seeds, d) * 0.02) if seeds else None  # S (PMA)
        self.ln_q, self.ln_kv, self.ln_mlp = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, history: History) -> tuple[torch.Tensor, torch.Tensor]:
        X = history.gather(history.items, history.ages) + self.position  # (B, T, d)
        Q = X if self.seeds is None else self.seeds.expand(len(X), -1, -1)  # (B, T or d_s, d)
        y, A = self.attn(self.ln_q(Q), self.ln_kv(X))
        X1 = y + Q
        return self.mlp(self.ln_mlp(X1)) + X1, A


class Ranker(nn.Module):
    """Dense module, item lookups, history aggregation, pairwise dot-product interaction, top MLP."""

    def __init__(self, config: dict, vocabulary: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        d, T, h = config["embedding_dim"], config["history_length"], config["history"]
        fused_lr = config["sparse_lr"] if config.get("tables", "torch") == "torchrec" else None
        self.lookups = nn.ModuleDict({
            kind: ItemLookup(kind, d, rows=config["rows"][kind], codebook_size=config["codebook_size"],
                             parameterization=config["parameterization"], ngram_depth=config["ngram_depth"],
                             vocabulary=vocabulary if kind == "ie" else None, fused_lr=fused_lr)
            for kind in sorted({config["item_ids"], h["item_ids"]})})
        F_ = config["dense_features"]
        self.register_buffer("dense_mean", torch.zeros(F_))
        self.register_buffer("dense_std", torch.ones(F_))
        self.dense = mlp([F_, *config["dense_hidden"], d], last_activation=True) if F_ else None
        self.dense_bias = nn.Parameter(torch.zeros(d)) if not F_ else None  # no dense features: a learned vector
        self.linear = nn.Parameter(torch.zeros(F_))  # w
        self.age = nn.Embedding(AGE_BUCKETS, d)  # bucket 0: the padding token
        if h["aggregation"] == "bypass":
            self.aggregate, m = Bypass(d, T), T
        elif h["aggregation"] == "transformer":
            self.aggregate, m = AttentionBlock(d, T, h["heads"]), T
        else:
            self.aggregate, m = AttentionBlock(d, T, h["heads"], seeds=h["seeds"]), h["seeds"]
        n = 2 + m
        i, j = torch.triu_indices(n, n, offset=1)  # the pairs j > i, as positions in the flattened (n, n) products
        self.register_buffer("pairs", i * n + j, persistent=False)
        self.top = mlp([d + n * (n - 1) // 2, *config["top_hidden"], 1])

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Click logits (B,) and the history attention weights (B, heads, Tq, T) (None for bypass)."""
        B, T = batch["hist_item"].shape
        f = (batch["dense"] - self.dense_mean) / self.dense_std  # (B, F)
        x_d = self.dense(f) if self.dense is not None else self.dense_bias.expand(B, -1)  # (B, d)
        target, history = self.lookups[self.config["item_ids"]], self.lookups[self.config["history"]["item_ids"]]
        hist_item, hist_codes = batch["hist_item"].flatten(), batch["hist_codes"].flatten(0, 1)  # (B*T,), (B*T, L)
        if target is history:  # one lookup: an item both target and history item is pooled once, one sparse grad
            items, index = target(torch.cat([batch["item_id"], hist_item]), torch.cat([batch["codes"], hist_codes]))
            target_rows, (target_index, hist_index) = items, index.split([B, B * T])
        else:
            target_rows, target_index = target(batch["item_id"], batch["codes"])
            items, hist_index = history(hist_item, hist_codes)
        x_i = target_rows.index_select(0, target_index)  # (B, d)
        ages = batch["hist_age"].long()  # int8 in the examples
        Y, A = self.aggregate(History(items, hist_index.view(B, T), self.age.weight, ages))  # (B, m, d)
        V = torch.cat([x_d[:, None], x_i[:, None], Y], dim=1)  # (B, n, d)
        Z = Gram.apply(V).flatten(1).index_select(1, self.pairs)  # (B, n(n-1)/2)
        return self.top(torch.cat([x_d, Z], dim=1)).squeeze(1) + f @ self.linear, A

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The tables the training loop's Adagrad steps (TorchRec's fused tables step themselves)."""
        return [lookup.weight for lookup in self.lookups.values() if not lookup.fused]

    def dense_parameters(self) -> list[nn.Parameter]:
        tables = {id(lookup.weight) for lookup in self.lookups.values()}
        return [p for p in self.parameters() if id(p) not in tables]


class Gram(torch.autograd.Function):
    """V V^T for V (B, n, d), with the backward written out: dV = (dZ + dZ^T) V, one batched product. Autograd's
    own backward makes two (one per operand) and sums them through a transposed, strided add that costs more
    than both products on a CPU."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, V: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(V)
        return V @ V.transpose(1, 2)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dZ: torch.Tensor) -> torch.Tensor:
        (V,) = ctx.saved_tensors
        return (dZ + dZ.transpose(1, 2)) @ V


def bce(logits: torch.Tensor, label: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), label, reduction=reduction)
