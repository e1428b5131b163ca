"""The Semantic ID model: content embedding x -> coarse-to-fine codes (c_1, ..., c_L). PAPER.md, section 2.

    x_n  = (x - mean) / (std sqrt(D))            input normalisation: standardised, E||x_n||^2 = 1
    z    = enc(x_n)                              MLP, D -> D'
    c, z_q, L_q = ResidualQuantizer(z)           L codebooks of K vectors (components/semid/quantizer.py)
    x_hat = dec(z + sg(z_q - z))                 MLP, D' -> D; straight-through gradient to the encoder
    loss = ||x_n - x_hat||^2 + L_q               with beta = 0.5 inside L_q

method "rqkmeans" keeps the normalisation and the quantizer but no autoencoder (z = x_n), with codebooks
from residual k-means: one peer study found it better, so users can compare both on their own data.

How training avoids the collapse seen in the best public RQ-VAE (docs/design-notes.md, "Codebook collapse"):
the autoencoder first trains alone for warmup_steps so the scale of z settles, then each level's codebook is
initialised by k-means on the residuals it will see, and codes that no item chose during restart_every steps
are restarted on live residuals. Per-level utilization is tracked during training.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from components import checkpoints
from components.errors import DataError
from components.layers import mlp
from components.params import RQVAEParams
from components.semid.quantizer import ResidualQuantizer

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it found is not news

STD_FLOOR = 1e-4  # all-MiniLM-L6-v2 has dimensions with std 0 (docs/design-notes.md, "MiniLM has dead dimensions")


class SemanticIdModel(nn.Module):
    """Normaliser, encoder, residual quantizer and decoder. For rqkmeans the encoder and decoder are empty."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        D, Dz = config["input_dim"], config["latent_dim"]
        autoencoder = config["method"] == "rqvae"
        hidden = list(config["hidden_dims"])
        self.register_buffer("mean", torch.zeros(D))
        self.register_buffer("std", torch.ones(D))
        self.encoder = mlp([D, *hidden, Dz], nn.SiLU) if autoencoder else nn.Sequential()
        self.quantizer = ResidualQuantizer(config["levels"], config["codebook_size"], Dz if autoencoder else D)
        self.decoder = mlp([Dz, *reversed(hidden), D], nn.SiLU) if autoencoder else nn.Sequential()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor, beta: float):
        """Loss terms and codes for a batch of raw embeddings x (B, D)."""
        x_n = self.normalize(x)
        z = self.encoder(x_n)  # (B, D')
        q = self.quantizer(z, beta)
        x_hat = self.decoder(z + (q.z_q - z).detach())  # (B, D)
        recon = ((x_n - x_hat) ** 2).sum(1).mean()
        return recon, q

    @torch.no_grad()
    def assign(self, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """SemIDs (N, L) int64 for raw embeddings x (N, D): the one code path for backfill and new items.
        Chunks of 4096 keep the (chunk, K) distance matrices in cache: 2x the items/s of 65,536."""
        out = [self.quantizer.encode(self.encoder(self.normalize(x[i:i + batch_size].float())))
               for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.quantizer.L, dtype=torch.int64)


def utilization(codes: torch.Tensor, K: int) -> list[float]:
    """Share of the K codes used at each level."""
    return [len(torch.unique(codes[:, level])) / K for level in range(codes.shape[1])]


def train(x: torch.Tensor, p: RQVAEParams, progress=None) -> tuple[SemanticIdModel, list[dict]]:
    """Fit a SemanticIdModel on embeddings x (N, D); deterministic on CPU for p.seed. Returns the model and
    a history of {step, recon, quant, utilization} rows. `progress(step)` is called once per step if given.

    Deterministic algorithms are switched on while training: the backward of the codebook lookup accumulates
    with several threads, and on a busy machine that gave a different checkpoint on every run."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _train(x, p, progress)
    finally:
        torch.use_deterministic_algorithms(previous)


def _train(x: torch.Tensor, p: RQVAEParams, progress) -> tuple[SemanticIdModel, list[dict]]:
    torch.manual_seed(p.seed)
    generator = torch.Generator().manual_seed(p.seed)
    model = SemanticIdModel(config_of(p, x.shape[1]))
    if p.normalize_input:
        model.mean.copy_(x.mean(0))
        # Each dimension standardised (std floored), then all scaled by 1/sqrt(D) so an item has norm ~1 like
        # the unit-norm input of a CU model: at per-dimension scale 1 (norm ~sqrt(D)) the reconstruction term
        # outweighs the quantizer and the latent merges items (200k benchmark items: 20.5% collisions vs 8.2%).
        model.std.copy_(x.std(0).clamp_min(STD_FLOOR) * math.sqrt(x.shape[1]))
    if p.method == "rqkmeans":
        model.quantizer.init_kmeans(model.normalize(x), p.seed, p.kmeans_iterations)
        return model, [{"step": 0, "utilization": utilization(model.assign(x), p.codebook_size)}]

    optimizer = torch.optim.Adam(model.parameters(), lr=p.lr)
    usage = torch.zeros(p.levels, p.codebook_size)
    probe = x[torch.randperm(len(x), generator=generator)[:20_000]]  # fixed sample for the history
    history = []
    order, cursor = torch.randperm(len(x), generator=generator), 0
    for step in range(p.steps):
        if cursor + p.batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        batch = x[order[cursor:cursor + p.batch_size]]
        cursor += p.batch_size
        if step < p.warmup_steps:  # the autoencoder alone, so the scale of z settles before codebooks exist
            x_n = model.normalize(batch)
            loss = ((x_n - model.decoder(model.encoder(x_n))) ** 2).sum(1).mean()
        else:
            if step == p.warmup_steps and p.kmeans_init:
                model.quantizer.init_kmeans(model.encoder(model.normalize(x)).detach(), p.seed,
                                            p.kmeans_iterations)
            recon, q = model(batch, p.beta)
            loss = recon + q.loss
            usage += torch.nn.functional.one_hot(q.codes, p.codebook_size).sum(0)
            if p.dead_code_restart and (step + 1 - p.warmup_steps) % p.restart_every == 0:
                restarted = model.quantizer.restart_dead_codes(usage, q.residuals, generator)
                if restarted:
                    log.debug("step %d: restarted %d dead codes", step, restarted)
                usage.zero_()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= p.warmup_steps and (step % 250 == 0 or step == p.steps - 1):
            with torch.no_grad():
                recon, q = model(probe, p.beta)
            history.append({"step": step, "recon": recon.item(), "quant": q.loss.item(),
                            "utilization": utilization(q.codes, p.codebook_size)})
        if progress:
            progress(step)
    return model, history


def config_of(p: RQVAEParams, input_dim: int) -> dict:
    """What a checkpoint needs to rebuild the model: plain JSON types only."""
    return {"method": p.method, "input_dim": input_dim, "latent_dim": p.latent_dim, "levels": p.levels,
            "codebook_size": p.codebook_size, "hidden_dims": list(p.hidden_dims)}


CHECKPOINT = checkpoints.Kind("RQ-VAE", "codebook_version", "current.json", "semid train_rqvae")


def codebook_version(model: SemanticIdModel) -> str:
    """The content hash that names a model's checkpoint file."""
    return checkpoints.content_hash(model.config, model.state_dict())


def save_checkpoint(model: SemanticIdModel, directory: Path, extra: dict) -> tuple[str, Path]:
    """Write models/rqvae/<codebook_version>.pt atomically; return the version and the path."""
    return checkpoints.save(CHECKPOINT, directory, model.config, model.state_dict(), extra)


def load_checkpoint(path: Path) -> tuple[SemanticIdModel, dict]:
    """Load a checkpoint without executing code and verify its content hash."""
    return checkpoints.load(CHECKPOINT, path, SemanticIdModel)


def read_current(directory: Path) -> tuple[str, Path]:
    """The codebook version that models/rqvae/current.json points at, and its checkpoint file."""
    version = checkpoints.read_pointer(CHECKPOINT, directory)
    if version is None:
        raise DataError(f"{Path(directory) / CHECKPOINT.pointer}: no current RQ-VAE checkpoint (run "
                        f"`{CHECKPOINT.made_by}` first)")
    return version, Path(directory) / f"{version}.pt"


def write_current(directory: Path, version: str) -> None:
    """Make a checkpoint that exists current (an atomic rename: readers never see half a pointer)."""
    checkpoints.write_pointer(CHECKPOINT, directory, version)


def load_current(directory: Path) -> tuple[SemanticIdModel, str]:
    """The current model, verified against the version its pointer names."""
    version, path = read_current(directory)
    model, ckpt = load_checkpoint(path)
    if ckpt["codebook_version"] != version:
        raise DataError(f"{path}: holds codebook_version {ckpt['codebook_version']}, "
                        f"but {directory}/current.json names {version}")
    return model, version
