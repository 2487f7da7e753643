"""COAP: projector initialisation, the correlation-aware update (eq. 5), the warm-started
recomputation (eq. 6), moment restoration, state memory and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from full_recipe_utils import adamw_state_bytes, assert_resume_matches, recipe_model, train_steps

from loraplex.training.recipes import make_recipe
from loraplex.training.recipes.coap import CoapAdamW


def optimizer(w, **group):
    settings = {"rank": 2, "update_interval": 2, "reproject_factor": 3, "seed": 0, **group}
    return CoapAdamW([{"params": [w], **settings}], lr=0.01)


def step_with(opt, w, g):
    w.grad = g.clone()
    opt.step()


def test_initial_projector_spans_the_gradients_top_subspace():
    torch.manual_seed(0)
    g = torch.randn(9, 2) @ torch.randn(2, 6)  # rank 2, tall: right-side projector (2 x 6)
    w = torch.nn.Parameter(torch.randn(9, 6))
    opt = optimizer(w)
    step_with(opt, w, g)
    p = opt.state[w]["projector"]
    assert p.shape == (2, 6)
    torch.testing.assert_close(p @ p.T, torch.eye(2), atol=1e-5, rtol=0)  # orthonormal rows
    torch.testing.assert_close(g @ p.T @ p, g, atol=1e-4, rtol=0)  # the gradient's row space exactly


def correlation_update(p, m, g, lr=0.1):
    """Eq. 5 from scratch: one SGD step on MSE(G PᵀP, G)·(1 − mean cos(M P, G)), gradient norm ≤ 1."""
    p = p.double().clone().requires_grad_(True)
    g, m = g.double(), m.double()
    recon, moment = g @ p.T @ p, m @ p
    cos = (moment * g).sum(1) / (moment.norm(dim=1) * g.norm(dim=1)).clamp(min=1e-8)
    loss = ((recon - g) ** 2).mean() * (1 - cos.mean())
    (grad,) = torch.autograd.grad(loss, p)
    grad = grad * min(1.0, 1.0 / (grad.norm().item() + 1e-6))
    return (p - lr * grad).detach()


def test_update_interval_step_is_the_correlation_aware_sgd_step():
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(8, 5))
    opt = optimizer(w)
    grads = [torch.randn(8, 5) for _ in range(3)]
    step_with(opt, w, grads[0])
    step_with(opt, w, grads[1])
    before = copy.deepcopy(opt.state[w])
    step_with(opt, w, grads[2])  # step index 2: 2 % update_interval == 0, not a multiple of 2 * 3
    expected = correlation_update(before["projector"], before["exp_avg"], grads[2])
    assert not torch.allclose(expected, before["projector"].double())
    torch.testing.assert_close(opt.state[w]["projector"].double(), expected, atol=1e-6, rtol=1e-5)
    # the moments were not re-projected (restore_state off) but kept accumulating in the old basis
    low = grads[2] @ expected.float().T
    torch.testing.assert_close(opt.state[w]["exp_avg"], 0.9 * before["exp_avg"] + 0.1 * low, atol=1e-5, rtol=1e-4)


def test_reprojection_is_a_randomized_svd_warm_started_from_the_old_subspace():
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(5, 8))  # wide: left-side projector (5 x 2)
    opt = optimizer(w, update_interval=1, reproject_factor=2)
    grads = [torch.randn(5, 8) for _ in range(3)]
    step_with(opt, w, grads[0])
    step_with(opt, w, grads[1])  # step index 1: an SGD update
    old = opt.state[w]["projector"].clone()
    step_with(opt, w, grads[2])  # step index 2: recomputation
    # randomized SVD of Gᵀ (n x m) with Ω = P_old (m x r): Q = qr(Gᵀ Ω), top-r right singular vectors of QᵀGᵀ
    gt = grads[2].T.double()
    q, _ = torch.linalg.qr(gt @ old.double())
    vh = torch.linalg.svd(q.T @ gt, full_matrices=False)[2][:2]
    new = opt.state[w]["projector"].double()
    assert new.shape == (5, 2)
    torch.testing.assert_close(new @ new.T, vh.T @ vh, atol=1e-5, rtol=0)  # the same subspace


def test_restore_state_carries_the_moments_into_the_new_subspace():
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(8, 5))
    opt = optimizer(w, update_interval=1, reproject_factor=1, restore_state=True)
    grads = [torch.randn(8, 5) for _ in range(2)]
    step_with(opt, w, grads[0])
    before = copy.deepcopy(opt.state[w])
    step_with(opt, w, grads[1])
    p0, p1 = before["projector"], opt.state[w]["projector"]
    m = (before["exp_avg"] @ p0) @ p1.T
    v = ((before["exp_avg_sq"].sqrt() @ p0) @ p1.T) ** 2
    low = grads[1] @ p1.T
    torch.testing.assert_close(opt.state[w]["exp_avg"], 0.9 * m + 0.1 * low, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], 0.999 * v + 0.001 * low ** 2, atol=1e-5, rtol=1e-4)


def test_state_memory_is_rank_times_dim(one_thread):
    recipe, model, opt = recipe_model("coap", {"rank": 4, "update_interval": 1, "reproject_factor": 2})
    fields = train_steps(model, opt, 3, recipe)
    expected = sum(4 * (2 * max(p.shape) * 4 + 4 * min(p.shape)) for p in model.trainable_parameters())
    assert fields[-1]["optimizer_state_bytes"] == opt.state_bytes() == expected
    assert expected < adamw_state_bytes(model.trainable_parameters()) / 2
    _, model2, opt2 = recipe_model("coap", {"rank_ratio": 4})  # rank = min(m, n) // 4
    train_steps(model2, opt2, 1)
    for p in model2.trainable_parameters():
        assert opt2.state[p]["exp_avg"].numel() == max(p.shape) * (min(p.shape) // 4)


def test_resume_equals_uninterrupted_run(tmp_path):
    assert_resume_matches(tmp_path, "coap", {"rank": 4, "update_interval": 1, "reproject_factor": 2})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="update_interval must be a positive integer"):
        make_recipe("coap", {"update_interval": 0})
    with pytest.raises(ValueError, match="rank_ratio must be a number >= 1"):
        make_recipe("coap", {"rank_ratio": 0.5})
