"""Compress then Serve: the joint fit against a dense reference of the paper's equations, serving a
compressed set in mixed batches, errors, unloading, and `loraplex compress`.

The dense reference (`dense_jd_full`) forms every ΔW_i and runs the alternating update as written in the
paper (U = top-R left singular vectors of the stack [w_1 ΔW_1 V | … | w_n ΔW_n V], then V likewise);
the library fits in QR "core" coordinates without forming any ΔW_i.
"""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import test_serving
import torch
from test_serving import PROMPTS, ids_of, make_adapter, new_engine
from tiny import char_tokenizer, tiny_llama

from loraplex.core.io import AdapterFileError, load
from loraplex.serving import SamplingParams
from loraplex.serving.adapters import AdapterNotFound, base_modules, read_adapter
from loraplex.serving.compress import SharedBasis, compress, fit_shared_basis, read_compressed
from loraplex.serving.layers import LoraWeights, PlanContext, ServingModule, StepPlan
from loraplex.training.evaluate import generate

# the tiny model, tokenizer and adapter folders of the serving tests (module-scoped fixtures)
base, tok, adapters, one_thread = test_serving.base, test_serving.tok, test_serving.adapters, test_serving.one_thread


def random_pairs(n, d_in, d_out, ranks, seed=0, missing=()):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        scale = 0.5 + i          # different norms: the weighting matters
        a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        b = scale * torch.randn(d_out, r, generator=g, dtype=torch.float64)
        out.append(None if i in missing else (a, b))
    return out


def dense_jd_full(deltas, weights, rank, iters=200):
    """The paper's alternating JD-Full on dense ΔW_i (weights w_i multiply each ΔW_i in the fit)."""
    v = torch.linalg.svd(torch.cat([w * d for w, d in zip(weights, deltas)], 0)).Vh[:rank].t()
    u = torch.linalg.svd(torch.cat([w * d @ v for w, d in zip(weights, deltas)], 1)).U[:, :rank]
    for _ in range(iters):
        v = torch.linalg.svd(torch.cat([w * d.t() @ u for w, d in zip(weights, deltas)], 1)).U[:, :rank]
        u = torch.linalg.svd(torch.cat([w * d @ v for w, d in zip(weights, deltas)], 1)).U[:, :rank]
    return u, v, [u.t() @ d @ v for d in deltas]


@pytest.mark.parametrize("d_in,d_out,ranks,rank", [(20, 16, [2, 3], 4), (9, 7, [3, 4, 2], 5)])
@pytest.mark.parametrize("normalize", [True, False])
def test_fit_matches_dense_alternating_reference(d_in, d_out, ranks, rank, normalize):
    pairs = random_pairs(4, d_in, d_out, ranks, seed=d_in)      # N < d (QR core) and N >= d (no QR)
    fit = fit_shared_basis(pairs, rank, iters=200, tol=0, normalize=normalize)
    deltas = [b @ a for a, b in pairs]
    weights = [1 / d.norm() if normalize else 1.0 for d in deltas]
    u, v, sigmas = dense_jd_full(deltas, weights, rank)
    eye = torch.eye(rank, dtype=torch.float64)
    assert torch.allclose(fit.u.t() @ fit.u, eye, atol=1e-10) and torch.allclose(fit.v.t() @ fit.v, eye, atol=1e-10)
    for i, d in enumerate(deltas):
        assert torch.allclose(fit.sigma[i], fit.u.t() @ d @ fit.v, atol=1e-9)          # Σ_i = Uᵀ ΔW_i V
        ours, ref = fit.u @ fit.sigma[i] @ fit.v.t(), u @ sigmas[i] @ v.t()
        assert torch.allclose(ours, ref, atol=1e-6 * d.norm()), (i, (ours - ref).norm() / d.norm())
        assert fit.energy[i] == pytest.approx(float(d.square().sum()), rel=1e-10)
        assert fit.energy[i] - fit.kept[i] == pytest.approx(float((d - ours).square().sum()), rel=1e-6, abs=1e-9)


def test_fit_is_exact_at_full_rank_and_skips_absent_adapters():
    pairs = random_pairs(3, 30, 25, [2, 4, 1], missing=(1,))
    fit = fit_shared_basis(pairs, rank=64)                       # capped at N = 2 + 1 = 3
    assert fit.u.shape == (25, 3) and fit.v.shape == (30, 3) and fit.sigma.shape == (3, 3, 3)
    assert not fit.sigma[1].any() and fit.energy[1] == 0
    for i in (0, 2):
        a, b = pairs[i]
        assert torch.allclose(fit.u @ fit.sigma[i] @ fit.v.t(), b @ a, atol=1e-10)
    # below the joint rank it is lossy, and never better than each adapter's own best rank-R approximation
    lossy = fit_shared_basis(pairs, rank=2, normalize=False)
    for i in (0, 2):
        a, b = pairs[i]
        s = torch.linalg.svdvals(b @ a)
        assert lossy.energy[i] - lossy.kept[i] >= float(s[2:].square().sum()) - 1e-9
    with pytest.raises(ValueError, match="rank must be >= 1"):
        fit_shared_basis(pairs, rank=0)


def test_power_iteration_path_matches_exact_eigh():
    """Large layers use block power iteration + Rayleigh-Ritz instead of a full eigh: same fit."""
    g = torch.Generator().manual_seed(1)
    shared_out, shared_in = torch.randn(70, 6, generator=g), torch.randn(6, 80, generator=g)
    pairs = [(torch.randn(3, 6, generator=g, dtype=torch.float64) @ shared_in.double()
              + 0.05 * torch.randn(3, 80, generator=g, dtype=torch.float64),
              shared_out.double() @ torch.randn(6, 3, generator=g, dtype=torch.float64)) for _ in range(12)]
    exact = fit_shared_basis(pairs, 5)
    power = fit_shared_basis(pairs, 5, exact_below=0)
    assert sum(power.kept) == pytest.approx(sum(exact.kept), rel=1e-4)
    for i in range(12):
        assert torch.allclose(power.u @ power.sigma[i] @ power.v.t(), exact.u @ exact.sigma[i] @ exact.v.t(),
                              atol=1e-3 * exact.energy[i] ** 0.5)


def test_segment_of_members_is_x_v_sigma_u_per_row():
    """One segment covers rows of different members; a member in a mix goes through the generic path."""
    torch.manual_seed(0)
    base_layer = torch.nn.Linear(6, 5)
    ctx = PlanContext()
    layer = ServingModule(base_layer, "linear", ctx)
    v, _ = torch.linalg.qr(torch.randn(6, 3))
    u, _ = torch.linalg.qr(torch.randn(5, 3))
    sig = torch.randn(4, 3, 3)
    layer.shared["set"] = SharedBasis(v, u.t().contiguous(), sig.transpose(1, 2).contiguous())
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    layer.add_lora("p", LoraWeights("linear", a.t().contiguous(), b.t().contiguous()))
    members = {"m0": ("set", 0), "m1": ("set", 1), "m3": ("set", 3)}
    rows = [(), (("p", 1.0),), (("m0", 1.0),), (("m1", 1.0),), (("m1", 1.0),), (("m3", 1.0),),
            (("m1", 0.5), ("p", 2.0))]
    plan = StepPlan(rows, members)
    assert [(s.start, s.stop, s.index.tolist()) for s in plan.segments] == [(2, 6, [0, 1, 1, 3])]
    assert [g.terms for g in plan.adapted] == [(("p", 1.0),), (("m1", 0.5), ("p", 2.0))]
    ctx.plan = plan
    x = torch.randn(len(rows), 3, 6)
    with torch.no_grad():
        out = layer(x)
    delta = {"p": b @ a, **{m: u @ sig[i] @ v.t() for m, (_, i) in members.items()}}
    for i, terms in enumerate(rows):
        want = base_layer(x[i]) + sum((w * x[i] @ delta[n].t() for n, w in terms), torch.zeros(3, 5))
        assert torch.allclose(out[i], want, atol=1e-5), (i, terms)


# --------------------------------------------------------------------------- compressed sets in the engine
MEMBERS = ["a3", "a5", "a6", "a8"]


@pytest.fixture(scope="module")
def compressed(base, adapters, tmp_path_factory):
    """a3/a5/a6/a8 (ranks 8, 1, 2, 4; two target sets) compressed at R = 6, saved and exported as LoRAs."""
    modules = base_modules(base)
    hosts = [read_adapter(adapters[n], n, modules, torch.float32) for n in MEMBERS]
    cset = compress(hosts, rank=6, name="cset")
    root = tmp_path_factory.mktemp("compressed")
    cset.save(root / "cset")
    for n in MEMBERS:
        cset.export_lora(n, root / "export" / n)
    return cset, root


def served_reference(base, tok, folders: dict, requests, max_tokens):
    from loraplex.core.model import AdapterModel

    model = AdapterModel(copy.deepcopy(base))
    for name, folder in folders.items():
        load(model, folder, name=name)
    out = []
    for prompt, adapter in requests:
        ids = ids_of(tok, prompt)
        if adapter is None:
            with model.disabled():
                out.append(generate(model, tok, [ids], max_new_tokens=max_tokens)[0])
            continue
        names = [adapter] if isinstance(adapter, str) else sorted(adapter)
        model.set_active(names, None if isinstance(adapter, str) else [adapter[n] for n in names])
        out.append(generate(model, tok, [ids], max_new_tokens=max_tokens)[0])
    return out


def test_compressed_set_served_in_mixed_batches(base, tok, adapters, compressed):
    cset, root = compressed
    # the saved set holds exactly U Σ_i Vᵀ, and the export is that same update as a plain LoRA
    modules = base_modules(base)
    back = read_compressed(root / "cset", modules, torch.float32)
    assert back.adapters == MEMBERS and set(back.layers) == set(cset.layers)
    for n in MEMBERS:   # what is served approximates the original s B A, with the error the report states
        host = read_adapter(adapters[n], n, modules, torch.float64)
        err = energy = 0.0
        for path in back.layers:
            orig = (host.layers[path].a_t @ host.layers[path].b_t).t() if path in host.layers else 0
            err += float((back.delta_weight(n, path).double() - orig).square().sum())
            energy += float(orig.square().sum()) if path in host.layers else 0.0
        assert (err / energy) ** 0.5 == pytest.approx(cset.report["relative_error"][n], rel=1e-3)
        assert 0.01 < cset.report["relative_error"][n] < 0.9
    engine = new_engine(base, tok, adapters, ["a1", "a2"], max_active=2, max_cached=2, max_batch=32)
    info = engine.add_compressed(root / "cset")
    assert info["adapters"] == MEMBERS and info["name"] == "cset"
    requests = [(p, a) for p in PROMPTS[:3] for a in
                [None, "a1", "a3", "a5", "a6", "a8", {"a3": 0.5, "a1": 1.0}, {"a5": 1.0, "a6": -0.5}]]
    outs = engine.generate([ids_of(tok, p) for p, _ in requests], [a for _, a in requests],
                           SamplingParams(max_tokens=10))
    folders = {"a1": adapters["a1"], **{n: root / "export" / n for n in MEMBERS}}
    want = served_reference(base, tok, folders, requests, 10)
    for (p, a), out, ref in zip(requests, outs, want):
        assert out.error is None and out.text == ref, (p, a)
    assert len({o.text for o in outs}) > 8
    # members of the set sit together: the last plan had one segment with several members
    mem = engine.memory()
    assert mem["compressed_bytes"] == cset.nbytes and mem["compressed_adapters"] == 4
    assert {a["name"]: a["state"] for a in engine.adapters()}["a5"] == "compressed"
    assert engine.adapter_names() == ["a1", "a2", *MEMBERS]


def test_segment_plan_used_when_members_decode_together(base, tok, compressed):
    cset, root = compressed
    engine = new_engine(base, tok, max_batch=8)
    engine.add_compressed(root / "cset")
    for p, a in zip(PROMPTS, ["a3", None, "a5", "a8", "a3", None]):
        engine.submit(ids_of(tok, p), a, SamplingParams(max_tokens=3))
    engine.step()
    assert [(s.start, s.stop, s.group) for s in engine.plan.segments] == [(2, 6, "cset")]
    assert engine.plan.adapted == []


def test_compression_errors_and_unloading_frees_memory(base, tok, adapters, compressed, tmp_path):
    cset, root = compressed
    modules = base_modules(base)
    dora = read_adapter(adapters["dora1"], "dora1", modules, torch.float32)
    with pytest.raises(ValueError, match="'dora1' cannot be compressed: it is a DoRA adapter"):
        compress([dora], rank=4)
    emb = read_adapter(adapters["emb"], "emb", modules, torch.float32)
    with pytest.raises(ValueError, match="embedding"):
        compress([emb], rank=4)
    # a set made for another base model is refused with the shapes named
    other = tiny_llama(len(char_tokenizer()), seed=3, hidden=48)
    wide = make_adapter(other, tmp_path / "wide", seed=1, r=2)
    wide_set = compress([read_adapter(wide, "w", base_modules(other), torch.float32)], rank=2)
    wide_set.save(tmp_path / "wide_set")
    with pytest.raises(AdapterFileError, match="do not fit the base layer"):
        read_compressed(tmp_path / "wide_set", modules, torch.float32)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "compressed_config.json").write_text(json.dumps({"format": "something else"}))
    (tmp_path / "junk" / "compressed.safetensors").write_bytes(b"x")
    with pytest.raises(AdapterFileError, match="not a loraplex compressed adapter set"):
        read_compressed(tmp_path / "junk", modules, torch.float32)

    engine = new_engine(base, tok, adapters, ["a1"])
    with pytest.raises(ValueError, match="taken"):
        engine.add_compressed(root / "cset", name="a1")
    engine.add_compressed(root / "cset")
    with pytest.raises(ValueError, match="taken"):
        engine.add_compressed(root / "cset", name="other")        # member names clash
    with pytest.raises(ValueError, match="loaded already"):
        engine.add_adapter("a3", adapters["a3"])
    engine.generate([ids_of(tok, "hi")] * 2, ["a3", "a1"], SamplingParams(max_tokens=2))
    installed = next(w for w in engine.served.wrappers.values() if w.shared)
    probe = weakref.ref(installed.shared["cset"].sigma_t)
    assert engine.memory()["compressed_bytes"] > 0
    with pytest.raises(ValueError, match="member of compressed set 'cset'"):
        engine.remove_adapter("a3")
    engine.remove_adapter("cset", wait=5)
    gc.collect()
    assert probe() is None and engine.memory()["compressed_bytes"] == 0
    assert all(not w.shared for w in engine.served.wrappers.values())
    with pytest.raises(AdapterNotFound, match="'a3'"):
        engine.submit(ids_of(tok, "hi"), "a3")
    engine.remove_adapter("a1", wait=5)
    assert not engine.served.wrappers                          # the bare model is back


def test_cli_compress_reports_error_exact_match_and_memory(monkeypatch, base, tok, adapters, tmp_path, capsys):
    import loraplex.models
    from loraplex.cli.main import main
    from loraplex.models import LoadedModel

    monkeypatch.setattr(loraplex.models, "load_model", lambda spec: LoadedModel(copy.deepcopy(base), tok, "tiny",
                                                                               "causal-lm", None))
    out = tmp_path / "set"
    assert main(["compress", "--model", "tiny", "--adapter", f"x={adapters['a3']}", "--adapter",
                 f"y={adapters['a6']}", "--rank", "3", "--output", str(out), "--task", "x=dates", "--task",
                 "y=sort", "--n", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["relative_error"]) == {"x", "y"} and 0 < report["relative_error"]["x"] < 1
    assert report["exact_match"]["x"]["task"] == "dates" and report["exact_match"]["y"]["examples"] == 2
    assert 0 <= report["exact_match"]["y"]["after"] <= 100
    assert report["saved_bytes"] == report["original_bytes"] - report["compressed_bytes"] > 0
    assert json.loads((out / "compressed_config.json").read_text())["report"]["exact_match"]
    assert main(["compress", "--model", "tiny", "--adapter", f"x={adapters['dora1']}", "--rank", "2",
                 "--output", str(tmp_path / "bad")]) == 2
    assert "cannot be compressed" in capsys.readouterr().err
    assert main(["compress", "--model", "tiny", "--rank", "2", "--output", str(tmp_path / "none")]) == 2
