"""EVA: the incremental PCA, the rank redistribution and the init against a reference written from the
paper (exact PCA of every layer's collected inputs), the parameter count, dropping rank-0 layers,
merging, files, mixed batches, determinism, and parity with PEFT 0.21 in both directions (after
calibration EVA is a plain LoRA with per-layer rank_pattern / alpha_pattern, so native files move both
ways; PEFT's `initialize_lora_eva_weights` makes the PEFT side).
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import hf_ids, tiny_llama
from method_checks import check_merge_unmerge, check_mixed_batch, randomize_adapters
from torch import nn

import loraplex
from loraplex import LoraConfig
from loraplex.methods.eva import IncrementalPCA

torch.set_num_threads(1)
SIX = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]   # all with d_in = 16


def batches(n: int = 2, batch: int = 3, seq: int = 10) -> list[dict]:
    out = []
    for i in range(n):
        ids = hf_ids(batch=batch, seq=seq, seed=200 + i)
        labels = ids.clone()
        labels[:, :3] = -100
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def pca(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(components, explained-variance ratios) of all rows at once, float64."""
    rows = rows.double()
    centred = rows - rows.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    return vh, s ** 2 / centred.pow(2).sum()


def same_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float, msg: str = "") -> None:
    a, b = a.double(), b.double()
    torch.testing.assert_close(a * torch.sign((a * b).sum(1, keepdim=True)), b, rtol=0, atol=atol, msg=msg)


def test_incremental_pca_equals_pca_of_all_rows():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(90, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    ipca = IncrementalPCA(6)
    for chunk in rows.split([20, 7, 33, 30]):
        ipca.update(chunk)
    comps, ratios = pca(rows)
    same_up_to_sign(ipca.components, comps, atol=1e-5)
    torch.testing.assert_close(ipca.ratios.double(), ratios, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ipca.mean.double(), rows.double().mean(0), atol=1e-5)


def test_init_and_rank_redistribution_match_the_paper():
    """rho=8 lets every layer offer all 16 components (the incremental PCA is then exact); tau=0 stops after
    both batches; the budget 2 x 12 goes to the largest explained-variance ratios model-wide."""
    data, r, alpha = batches(), 2, 4.0
    base = tiny_llama()
    collected: dict[str, list] = {}

    def grab(path):
        def hook(module, args):
            collected.setdefault(path, []).append(args[0])
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in base.named_modules() if n.endswith(tuple(SIX))]
    with torch.no_grad():
        for b in data:
            base(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    masks = [(b["attention_mask"].bool() & (b["labels"] != -100)) for b in data]
    ref = {p: pca(torch.cat([x[m] for x, m in zip(xs, masks)])) for p, xs in collected.items()}
    pooled = sorted(((ratio.item(), i, p) for i, (p, (_, ratios)) in enumerate(ref.items())
                     for ratio in ratios), key=lambda t: (-t[0], t[1]))[: r * len(ref)]
    expected = {p: sum(1 for _, _, q in pooled if q == p) for p in ref}

    pm = loraplex.attach(base, LoraConfig(method="eva", r=r, alpha=alpha, targets=SIX,
                                          options={"rho": 8, "tau": 0.0, "max_passes": 1}), calibration_data=data)
    layers = pm.adapted_layers("default")
    ranks = {p: layers[p].adapters["default"].r if p in layers else 0 for p in ref}
    # ties (layers sharing one input have equal ratios) may split differently; the multiset cannot
    assert sorted(ranks.values()) == sorted(expected.values())
    for path, layer in layers.items():
        ad = layer.adapters["default"]
        same_up_to_sign(ad.lora_A, ref[path][0][: ad.r], atol=1e-4, msg=path)
        assert torch.equal(ad.lora_B, torch.zeros_like(ad.lora_B))
        assert ad.alpha == pytest.approx(alpha * ad.r / r) and ad.scale == pytest.approx(alpha / r)
    config = pm.configs["default"]
    assert all(config.rank_and_alpha(p)[0] == layers[p].adapters["default"].r for p in layers)
    x = hf_ids()
    torch.testing.assert_close(pm(x).logits, tiny_llama()(x).logits, rtol=0, atol=0)   # B = 0: base unchanged


def test_whitening_divides_rows_by_root_singular_values():
    data = batches()
    opts = {"rho": 1, "tau": 0.0, "max_passes": 1}
    plain = loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2, targets=["q_proj"], options=opts),
                            calibration_data=data)
    white = loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2, targets=["q_proj"],
                                                     options={**opts, "whiten": True}), calibration_data=data)
    a = plain.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A
    w = white.model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A
    ratio = a / w
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4) and (ratio > 1).all()


class Toy(nn.Module):
    """Two layers on the same isotropic data: a narrow one (4 inputs) and a wide one (32 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.small = nn.Linear(4, 3)
        self.wide = nn.Linear(32, 3)

    def forward(self, x):
        return self.small(x[..., :4]) + self.wide(x)


def test_rank_zero_layers_are_dropped_and_files_still_round_trip(tmp_path):
    """Budget 2 + 2: the narrow layer's ratios (~1/4 each) beat the wide one's (~1/32), so it takes all 4."""
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(50, 32, generator=g) for _ in range(3)]
    pm = loraplex.attach(Toy(), LoraConfig(method="eva", r=2, alpha=2, targets=["small", "wide"],
                                           options={"tau": 0.0, "max_passes": 1}), calibration_data=data)
    assert list(pm.adapted_layers("default")) == ["small"]
    assert type(pm.model.wide) is nn.Linear                      # unwrapped
    small = pm.model.small.adapters["default"]
    assert small.r == 4 and small.alpha == 4.0 and small.scale == 1.0
    assert pm.trainable_parameter_count() == 4 * (4 + 3)
    randomize_adapters(pm)
    x = torch.randn(5, 32, generator=g)
    expected = pm(x)
    pm.save(tmp_path)
    loaded = loraplex.load(Toy(), tmp_path)
    assert list(loaded.adapted_layers("default")) == ["small"]
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_merge_unmerge_and_mixed_batch():
    data = batches()
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2, alpha=4), "a", calibration_data=data)
    pm.add_adapter("b", LoraConfig(method="eva", r=3, alpha=3, options={"rho": 1.0}), calibration_data=data)
    randomize_adapters(pm)
    x = hf_ids(batch=5)
    pm.set_active("a")
    check_merge_unmerge(pm, x, rtol=1e-5, atol=1e-5, restore_atol=1e-6, only="base_layer.weight", logits=True)
    check_mixed_batch(pm, x, rtol=2e-5, atol=2e-5, logits=True, no_grad=True)


def test_calibration_is_deterministic_and_logged(caplog):
    data = batches(n=3)
    with caplog.at_level(logging.INFO, logger="loraplex"):
        a = loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2), calibration_data=data)
    assert any(rec.message.startswith("eva: default initialised") for rec in caplog.records)
    b = loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2), calibration_data=data)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_options_are_validated():
    with pytest.raises(ValueError, match="rho=0.5 is not allowed; rho must be a number >= 1"):
        loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2, options={"rho": 0.5}))
    with pytest.raises(ValueError, match="no option.*'whitening'"):
        loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2, options={"whitening": True}))


# --------------------------------------------------------------------------- PEFT 0.21
def test_peft_eva_adapter_loads_in_loraplex(tmp_path):
    from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights
    from peft import LoraConfig as PeftLoraConfig

    data, x = batches(n=3), hf_ids()
    config = PeftLoraConfig(r=2, lora_alpha=4, target_modules=SIX + ["down_proj"], init_lora_weights="eva",
                            eva_config=EvaConfig(rho=2.0, tau=0.9))
    peft_model = get_peft_model(tiny_llama(), config)
    initialize_lora_eva_weights(peft_model, dataloader=data, show_progress_bar=False)
    randomize_adapters(peft_model)
    with torch.no_grad():
        expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path)
    ours = loraplex.load(tiny_llama(), tmp_path)
    assert {a.r for layer in ours.adapted_layers().values() for a in layer.adapters.values()} != {2}
    torch.testing.assert_close(ours(x).logits, expected, rtol=1e-6, atol=1e-6)


def test_loraplex_eva_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    x = hf_ids()
    pm = loraplex.attach(tiny_llama(), LoraConfig(method="eva", r=2, alpha=4), calibration_data=batches(n=3))
    assert {a.r for layer in pm.adapted_layers().values() for a in layer.adapters.values()} != {2}
    randomize_adapters(pm)
    with torch.no_grad():
        expected = pm(x).logits
    pm.save(tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, expected, rtol=1e-6, atol=1e-6)
