"""Flora: Adafactor with compressed, resampled momentum and compressed gradient accumulation,
checked against a float64 reference written from the paper's equations; state memory; resume."""

from __future__ import annotations

import math

import pytest
import torch
from full_recipe_utils import adamw_state_bytes, assert_resume_matches, recipe_model, train_steps

from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.flora import Flora


def gaussian(seed: int, shape: tuple[int, int], rank: int) -> torch.Tensor:
    """The documented projection: N(0, 1/r) entries from a CPU generator seeded with `seed`, on the
    smaller side of the matrix (r x m when m < n, else n x r)."""
    m, n = shape
    size = (rank, m) if m < n else (n, rank)
    return (torch.randn(size, generator=torch.Generator().manual_seed(seed)) / math.sqrt(rank)).double()


def reference_flora(w0, grads, seeds, rank, kappa, lr, b1=0.9, eps=(1e-30, 1e-3), decay=-0.8):
    """Adafactor (factored second moment, update clipping, relative step size) with Flora's momentum
    c: update = (1-β1) U + β1 up(c); every κ steps c ← down'(up(c)); c ← β1 c + (1-β1) down(U)."""
    m, n = w0.shape
    left = m < n
    down = (lambda p, x: p @ x) if left else (lambda p, x: x @ p)
    up = (lambda p, c: p.T @ c) if left else (lambda p, c: c @ p.T)
    w = w0.double().clone()
    row, col = torch.zeros(m, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    c = torch.zeros((rank, n) if left else (m, rank), dtype=torch.float64)
    rms = lambda t: t.norm() / t.numel() ** 0.5  # noqa: E731
    proj = gaussian(seeds[0], (m, n), rank)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        step_lr = lr * max(eps[1], rms(w).item())
        b2 = 1 - t ** decay
        sq = g ** 2 + eps[0]
        row = b2 * row + (1 - b2) * sq.mean(1)
        col = b2 * col + (1 - b2) * sq.mean(0)
        u = g / torch.sqrt((row / row.mean())[:, None] * col[None, :])
        momentum = up(proj, c)
        update = (1 - b1) * u + b1 * momentum
        if t % kappa == 0:
            proj = gaussian(seeds[t], (m, n), rank)
            c = down(proj, momentum)
        c = b1 * c + (1 - b1) * down(proj, u)
        update = update / max(1.0, rms(update).item())
        w = w - step_lr * update
    return w, c


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_matches_reference_with_resampling(shape):
    torch.manual_seed(0)
    rank, kappa, steps = 3, 2, 5
    w = torch.nn.Parameter(torch.randn(shape))
    w0 = w.detach().clone()
    grads = [torch.randn(shape) for _ in range(steps)]
    opt = Flora([w], lr=0.05, rank=rank, kappa=kappa, seed=7)
    seeds = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        seeds.append(opt.state[w]["seed"])
    seeds = [seeds[0]] + seeds  # seeds[t]: the projection in force after step t (seeds[0]: the first)
    assert len(set(seeds)) == 1 + steps // kappa  # a fresh projection every κ steps
    expected_w, expected_c = reference_flora(w0, grads, seeds, rank, kappa, lr=0.05)
    torch.testing.assert_close(opt.state[w]["exp_avg"].double(), expected_c, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.detach().double(), expected_w, rtol=1e-5, atol=1e-6)
    assert opt.state[w]["exp_avg"].shape == ((rank, 10) if shape[0] < shape[1] else (10, rank))


def test_accumulation_is_kept_compressed_between_micro_batches():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 10))
    opt = Flora([w], lr=0.01, rank=3, seed=3)
    opt.compress_accumulation(4)
    xs = [torch.randn(5, 10) for _ in range(2)]
    full = torch.zeros(6, 10)
    for x in xs:
        (x @ w.T).pow(2).sum().backward()
        assert w.grad is None  # only the compressed (4 x 10) buffer survives the micro-batch
        full += 2 * (x @ w.T).T.detach() @ x
    p = gaussian(opt.accumulation_seed(w), (6, 10), 4).float()
    opt.decompress_gradients()
    torch.testing.assert_close(w.grad, p.T @ p @ full, rtol=1e-5, atol=1e-5)
    seed = opt.accumulation_seed(w)
    opt.step()
    assert opt.accumulation_seed(w) != seed  # a new projection for the next step's accumulation
    w.grad = torch.ones(6, 10)
    opt._packs[w] = torch.zeros(4, 10)
    with pytest.raises(RuntimeError, match="decompress_gradients"):
        opt.step()


def test_state_memory_is_rank_times_dim(one_thread):
    recipe, model, opt = recipe_model("flora", {"rank": 4, "kappa": 2})
    fields = train_steps(model, opt, 3, recipe)
    expected = sum(4 * (4 * max(p.shape) + p.shape[0] + p.shape[1]) for p in model.trainable_parameters())
    assert fields[-1]["optimizer_state_bytes"] == opt.state_bytes() == expected
    assert expected < adamw_state_bytes(model.trainable_parameters()) / 3
    # the compressed momentum is what is stored: r x max(m, n) per matrix, no projection matrix
    for p in model.trainable_parameters():
        assert opt.state[p]["exp_avg"].numel() == 4 * max(p.shape)


def test_resume_equals_uninterrupted_run(tmp_path):
    assert_resume_matches(tmp_path, "flora", {"rank": 4, "kappa": 2}, grad_accum=2)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="kappa must be a positive integer"):
        make_recipe("flora", {"kappa": 0})
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        make_recipe("flora", {"rank": 2.5})
    with pytest.raises(ValueError, match="beta1"):
        Flora([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, beta1=1.0)
