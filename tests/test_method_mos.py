"""MoS (`loraplex/methods/mos.py`) against the paper's equation and its four differentiation strategies.

Reference, written here from the paper in float64 from the raw tensors, shard by shard:
    y = W x + b + s B A x,  s = alpha / r,
    row j of A = concatenation of pool shards P_A[i_A[j·l + t]] for t = 0..l-1,
    column j of B = concatenation of P_B[i_B[j·l + t]],
with one pool pair per group of layers (module name and shape) and a fixed index matrix per layer.
PEFT has no MoS, so there is no parity test; files are our own (peft_type "MOS").
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2
from method_checks import (
    BlockNet,
    check_gpt2_trains_and_merges,
    check_merge_unmerge,
    check_mixed_batch,
    check_save_load,
    make_net,
    perturb,
    reference_with_deltas,
    x_seq,
)
from safetensors.torch import load_file

import loraplex
from loraplex import LoraConfig, attach

TARGETS = ["q", "up", "down"]
R, E, P, L_SHARDS, BLOCKS = 4, 2, 1, 2, 4     # rank, equivalent rank, private rank, shards per vector, layers
OPTIONS = {"equivalent_rank": E, "private_rank": P, "shards": L_SHARDS}
SHAPES = {"q": (8, 8), "up": (8, 16), "down": (16, 8)}   # name: (d_in, d_out)


def net(seed: int = 0) -> BlockNet:
    """BLOCKS blocks, each with Linear 8->8, Linear 8->16 and GPT-2 Conv1D 16->8 adapted."""
    return make_net(seed, blocks=BLOCKS)


def config(**kw) -> LoraConfig:
    options = {**OPTIONS, **kw.pop("options", {})}
    return LoraConfig(**{"method": "mos", "r": R, "alpha": 6.0, "targets": TARGETS, "options": options, **kw})


def group_of(path: str) -> str:
    name = path.rsplit(".", 1)[-1]
    d_in, d_out = SHAPES[name]
    return f"{name}_{d_out}x{d_in}"


def mos_delta(pool_a, pool_b, index_a, index_b, scale: float) -> torch.Tensor:
    pa, pb = pool_a.detach().double(), pool_b.detach().double()
    rows = [torch.cat([pa[int(index_a[j * L_SHARDS + t])] for t in range(L_SHARDS)]) for j in range(R)]
    cols = [torch.cat([pb[int(index_b[j * L_SHARDS + t])] for t in range(L_SHARDS)]) for j in range(R)]
    return scale * torch.stack(cols, dim=1) @ torch.stack(rows)


def deltas_of(model, name: str = "default") -> dict[str, torch.Tensor]:
    pools = model.shared_tensors[name].pools
    out = {}
    for path, layer in model.adapted_layers(name).items():
        ad = layer.adapters[name]
        pool = pools[group_of(path)]
        out[path] = mos_delta(pool.lora_A, pool.lora_B, ad.mos_index_A, ad.mos_index_B, 6.0 / R)
    return out


def test_output_matches_paper_equation():
    base = net()
    model = attach(copy.deepcopy(base), config())
    perturb(model, std=0.5)
    x = x_seq()
    ref = reference_with_deltas(base, x, deltas_of(model))
    torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_starts_as_identity_with_a_gradient():
    base = net()
    model = attach(copy.deepcopy(base), config())
    x = x_seq()
    out = model(x)
    torch.testing.assert_close(out, base(x), rtol=0, atol=0)   # P_B = 0
    out.square().sum().backward()
    pool = model.shared_tensors["default"].pools["q_8x8"]
    assert pool.lora_B.grad.abs().sum() > 0


def indices(model, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = model.adapted_layers()
    return [(layers[f"blocks.{i}.{name}"].adapters["default"].mos_index_A,
             layers[f"blocks.{i}.{name}"].adapters["default"].mos_index_B) for i in range(BLOCKS)]


def test_routing_subset_selection_privatisation_and_pair_dissociation():
    model = attach(net(), config())
    public = (E - P) * BLOCKS * L_SHARDS                 # public shards of one pool
    assert model.shared_tensors["default"].pools["q_8x8"].lora_A.shape == (E * BLOCKS * L_SHARDS, 8 // L_SHARDS)
    privates = []
    for index_a, index_b in indices(model, "q"):
        assert index_a.shape == index_b.shape == (R * L_SHARDS,)
        n_public = (R - P) * L_SHARDS
        for index in (index_a, index_b):
            assert len(set(index[:n_public].tolist())) == n_public           # no shard twice in a layer
            assert int(index[:n_public].max()) < public                       # drawn from the public part
        assert torch.equal(index_a[n_public:], index_b[n_public:])            # the layer's private shards
        privates.append(set(index_a[n_public:].tolist()))
        assert all(i >= public for i in privates[-1])
        assert not torch.equal(index_a[:n_public], index_b[:n_public])       # A, B drawn independently
    assert all(not (a & b) for i, a in enumerate(privates) for b in privates[i + 1:])   # private per layer
    same = attach(net(), config(options={"dissociate": False}))
    assert all(torch.equal(a, b) for a, b in indices(same, "q"))


def test_routing_is_deterministic_for_a_seed():
    one, two = attach(net(), config()), attach(net(), config())
    other = attach(net(), config(options={"seed": 1}))
    for (a1, b1), (a2, b2) in zip(indices(one, "up"), indices(two, "up")):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert any(not torch.equal(a1, a3) for (a1, _), (a3, _) in zip(indices(one, "up"), indices(other, "up")))


def test_trainable_parameters_are_a_rank_e_lora_and_pools_are_stored_once(tmp_path):
    model = attach(net(), config())
    assert model.trainable_parameter_count() == sum(E * BLOCKS * (d_in + d_out) for d_in, d_out in SHAPES.values())
    names = list(model.named_trainable_parameters())
    assert all(n.startswith("shared_tensors.default.pools.") for n in names) and len(names) == 2 * 3
    model.save(tmp_path)
    keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    pools = [k for k in keys if k.startswith("base_model.mos.")]
    assert len(pools) == len(set(pools)) == 2 * 3
    assert len(keys) == len(pools) + 2 * 3 * BLOCKS                              # + two index buffers per layer


def test_merge_then_unmerge_restores_base_and_merged_equals_unmerged():
    model = attach(net(), config())
    perturb(model, std=0.5)
    check_merge_unmerge(model, x_seq(), rtol=1e-5, atol=1e-5, restore_atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    model = attach(net(), config(options={"seed": 4}))
    perturb(model, std=0.5)
    loaded, _ = check_save_load(model, net, x_seq(), tmp_path, peft_type="MOS", rtol=0, atol=0)
    for (a1, b1), (a2, b2) in zip(indices(model, "down"), indices(loaded, "down")):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_load_refuses_indices_outside_the_pool(tmp_path):
    from safetensors.torch import save_file

    model = attach(net(), config())
    model.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.blocks.0.q.mos_index_A"][0] = 10_000
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(loraplex.AdapterFileError, match="outside the pool"):
        loraplex.load(net(), tmp_path)


def test_save_as_plain_lora_loads_on_the_unmodified_base(tmp_path):
    model = attach(net(), config())
    perturb(model, std=0.5)
    x = x_seq()
    expected = model(x)
    model.save(tmp_path, as_lora=True)
    # s is folded into B' before the products: fp32 rounding relative to the largest output (~20)
    tol = 5e-6 * float(expected.abs().max())
    torch.testing.assert_close(loraplex.load(net(), tmp_path)(x), expected, rtol=1e-5, atol=tol)


def test_mixed_batch_equals_each_row_alone():
    model = attach(net(), config(init="random"), name="a")
    model.add_adapter("b", config(init="random", options={"seed": 2}))
    check_mixed_batch(model, x_seq(rows=5), rtol=1e-6, atol=1e-6)


def test_gpt2_trains_and_merges():
    model = attach(tiny_gpt2(), LoraConfig(method="mos", r=2, targets=["c_attn", "c_proj", "c_fc"],
                                           options={"equivalent_rank": 1, "private_rank": 0}))
    perturb(model, std=0.5)
    check_gpt2_trains_and_merges(model, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kw", "message"), [
    ({"options": {"shards": 3}}, "shards=3 shards, which must divide"),
    ({"options": {"equivalent_rank": 1, "private_rank": 0}, "r": 8}, "raise equivalent_rank or lower r"),
    ({"options": {"private_rank": 3}}, "private_rank .3. cannot exceed equivalent_rank"),
    ({"options": {"private_rank": 2}}, "leaves no public shards"),
    ({"options": {"dissociate": 1}}, "dissociate must be true or false"),
    ({"options": {"router": "learned"}}, "does not take option"),
    ({"init": "gaussian"}, "init must be one of"),
    ({"rank_pattern": {"q": 2}}, "rank_pattern"),
])
def test_bad_settings_say_what_is_allowed(kw, message):
    with pytest.raises(ValueError, match=message):
        attach(net(), config(**kw))
