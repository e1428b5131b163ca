"""The residual quantizer and the Semantic ID model: the math of PAPER.md, determinism, no collapse."""
import dataclasses

import pytest
import torch

from components.errors import DataError
from components.params import RQVAEParams
from components.semid.quantizer import ResidualQuantizer
from components.semid.rqvae import SemanticIdModel, config_of, load_checkpoint, save_checkpoint, train, utilization


def clustered(n=4000, d=24, clusters=40, seed=0) -> torch.Tensor:
    """Points around `clusters` centres with sub-structure: something hierarchical codes can describe."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 3
    sub = torch.randn(clusters, 8, d, generator=g)
    which, part = torch.randint(0, clusters, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)
    return centres[which] + sub[which, part] + 0.3 * torch.randn(n, d, generator=g)


SMALL = RQVAEParams(levels=3, codebook_size=16, latent_dim=8, hidden_dims=(32,), steps=600, warmup_steps=100,
                    batch_size=256, restart_every=50)


def test_quantizer_follows_the_residual_recurrence_and_loss():
    torch.manual_seed(0)
    q = ResidualQuantizer(L=3, K=5, dim=4)
    z = torch.randn(7, 4)
    out = q(z, beta=0.5)
    r, z_q, loss = z.clone(), torch.zeros_like(z), torch.tensor(0.0)
    for level in range(3):
        v = q.codebooks[level].detach()
        c = torch.cdist(r, v).argmin(1)  # brute force: the nearest codebook vector
        assert torch.equal(out.codes[:, level], c)
        assert torch.allclose(out.residuals[:, level], r)
        loss += 1.5 * ((r - v[c]) ** 2).sum(1).mean()  # beta * commitment + codebook: equal values forward
        z_q, r = z_q + v[c], r - v[c]
    assert torch.allclose(out.z_q, z_q) and torch.allclose(out.loss, loss)
    assert torch.equal(q.encode(z), out.codes)


def test_commitment_and_codebook_terms_send_gradients_where_the_paper_says():
    q = ResidualQuantizer(L=1, K=3, dim=2)
    z = torch.randn(5, 2, requires_grad=True)
    q(z, beta=0.5).loss.backward()
    v = q.codebooks[0].detach()[q.encode(z.detach())[:, 0]]
    assert torch.allclose(z.grad, 0.5 * 2 * (z.detach() - v) / 5)  # d/dz of beta*||z - sg(v)||^2, mean over B


def test_kmeans_init_uses_every_code_and_dead_codes_restart_on_live_residuals():
    x = clustered(d=8)
    q = ResidualQuantizer(L=2, K=16, dim=8)
    q.init_kmeans(x, seed=0)
    assert utilization(q.encode(x), 16) == [1.0, 1.0]
    q.codebooks.data[0, :4] = 1e6  # four codes no point will ever choose
    assert utilization(q.encode(x), 16)[0] == 0.75
    out = q(x, beta=0.5)
    usage = torch.nn.functional.one_hot(out.codes, 16).sum(0)
    assert q.restart_dead_codes(usage, out.residuals, torch.Generator().manual_seed(0)) == 4
    assert utilization(q.encode(x), 16)[0] == 1.0


def test_training_uses_every_code_and_reconstructs():
    x = clustered()
    model, history = train(x, SMALL)
    codes = model.assign(x)
    assert codes.shape == (len(x), 3) and codes.dtype == torch.int64
    assert min(utilization(codes, 16)) >= 0.95, utilization(codes, 16)
    assert min(min(h["utilization"]) for h in history) >= 0.5  # never collapsed on the way
    # normalised input has total variance D: the decoder explains most of it, better than at the start
    assert history[-1]["recon"] < min(0.35 * x.shape[1], history[0]["recon"])


def test_rqkmeans_method_needs_no_autoencoder():
    x = clustered()
    model, _ = train(x, dataclasses.replace(SMALL, method="rqkmeans"))
    assert len(model.encoder) == 0 and len(model.decoder) == 0
    assert min(utilization(model.assign(x), 16)) >= 0.95


def test_same_seed_same_checkpoint_and_round_trip_keeps_semids(tmp_path):
    x = clustered(n=1500)
    p = dataclasses.replace(SMALL, steps=200)
    a, _ = train(x, p)
    b, _ = train(x, p)
    version_a, path = save_checkpoint(a, tmp_path / "a", {})
    version_b, _ = save_checkpoint(b, tmp_path / "b", {})
    assert version_a == version_b
    c, _ = train(x, dataclasses.replace(p, seed=1))
    assert save_checkpoint(c, tmp_path / "c", {})[0] != version_a
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["codebook_version"] == version_a
    assert torch.equal(loaded.assign(x), a.assign(x))


def test_assignment_is_batch_size_invariant():
    x = clustered(n=1000)
    model = SemanticIdModel(config_of(SMALL, x.shape[1]))
    assert torch.equal(model.assign(x, batch_size=7), model.assign(x))


def test_corrupt_or_edited_checkpoint_is_a_clear_error(tmp_path):
    model, _ = train(clustered(n=500), dataclasses.replace(SMALL, steps=120))
    _, path = save_checkpoint(model, tmp_path, {})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated.pt: not a valid semid RQ-VAE checkpoint"):
        load_checkpoint(truncated)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["quantizer.codebooks"][0, 0, 0] += 1.0
    edited = tmp_path / "edited.pt"
    torch.save(ckpt, edited)
    with pytest.raises(DataError, match="does not match its recorded codebook_version"):
        load_checkpoint(edited)
    with pytest.raises(DataError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_loading_never_executes_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"config": Payload()}, evil)
    with pytest.raises(DataError, match="not a valid semid RQ-VAE checkpoint"):
        load_checkpoint(evil)
