"""MiLoRA-style prompt routing: the router's math against a hand computation, held-out accuracy on the
built-in tasks, and "route:<router>" requests served exactly like the same request naming the chosen
adapter (or weighted mix) explicitly."""

from __future__ import annotations

import copy
import json

import pytest
import test_serving
import torch
from test_serving import new_engine

from loraplex.core.io import AdapterFileError
from loraplex.data import load_data
from loraplex.data.tokenize import prompt_ids
from loraplex.serving import SamplingParams
from loraplex.serving.adapters import AdapterNotFound
from loraplex.serving.routing import PromptRouter, fit_router, prompt_features

# the tiny model, tokenizer and adapter folders of the serving tests (module-scoped fixtures)
base, tok, adapters, one_thread = test_serving.base, test_serving.tok, test_serving.adapters, test_serving.one_thread

TASKS = {"a1": "dates", "a2": "arithmetic", "a4": "sort"}


def task_prompts(tok, split, n):
    return {name: [prompt_ids(tok, ex) for ex in load_data(task, split, n, 0)] for name, task in TASKS.items()}


def test_centroid_router_matches_hand_computation(base, tok):
    emb = base.get_input_embeddings()
    train = task_prompts(tok, "train", 20)
    router = fit_router(emb, train, kind="centroid", temperature=0.1, top_k=2)
    w = emb.weight.detach().double()

    def feature(ids):
        e = w[ids].mean(0)
        return e / e.norm()

    cents = []
    for name in TASKS:
        c = torch.stack([feature(ids) for ids in train[name]]).mean(0)
        cents.append(c / c.norm())
    cents = torch.stack(cents)
    for ids in [p for ps in task_prompts(tok, "test", 3).values() for p in ps]:
        sims = cents @ feature(ids) / 0.1
        p = torch.softmax(sims, 0)
        top = torch.topk(p, 2)
        want = {list(TASKS)[int(i)]: float(v / top.values.sum()) for i, v in zip(top.indices, top.values)}
        got = router.route(prompt_features(emb, [ids])[0])
        assert set(got) == set(want)
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-5)


@pytest.mark.parametrize("kind", ["centroid", "linear"])
def test_router_picks_the_task_adapter_on_held_out_prompts(base, tok, kind, tmp_path):
    emb = base.get_input_embeddings()
    router = fit_router(emb, task_prompts(tok, "train", 60), kind=kind)
    test = task_prompts(tok, "test", 30)
    for k, name in enumerate(TASKS):
        picked = router.probabilities(prompt_features(emb, test[name])).argmax(1)
        assert (picked == k).float().mean() >= 0.9, (kind, name, picked.tolist())
    router.save(tmp_path / "r")
    back = PromptRouter.load(tmp_path / "r")
    assert back.adapters == list(TASKS) and torch.equal(back.weight, router.weight) and back.kind == kind


def test_route_requests_are_served_like_the_chosen_adapter(base, tok, adapters, tmp_path):
    engine = new_engine(base, tok, adapters, list(TASKS), max_active=3, max_cached=3)
    emb = engine.served.model.get_input_embeddings()
    train = task_prompts(tok, "train", 60)
    engine.add_router("tasks", fit_router(emb, train))
    engine.add_router("mix", fit_router(emb, train, top_k=2, temperature=0.5))
    test = task_prompts(tok, "test", 2)
    prompts = [p for ps in test.values() for p in ps]
    params = SamplingParams(max_tokens=6)
    routed = engine.generate(prompts, ["route:tasks"] * len(prompts), params)
    assert [c.routed for c in routed] == [n for n in TASKS for _ in range(2)]
    explicit = engine.generate(prompts, [c.routed for c in routed], params)
    assert [c.text for c in routed] == [c.text for c in explicit]
    mixed = engine.generate(prompts, ["route:mix"] * len(prompts), params)
    for c in mixed:
        assert isinstance(c.routed, dict) and len(c.routed) == 2 and sum(c.routed.values()) == pytest.approx(1)
    assert [c.text for c in mixed] == [c.text for c in engine.generate(prompts, [c.routed for c in mixed], params)]
    assert engine.router_names() == ["route:tasks", "route:mix"]

    with pytest.raises(AdapterNotFound, match="no router named 'nope'"):
        engine.submit(prompts[0], "route:nope")
    with pytest.raises(ValueError, match="not loaded"):
        engine.add_router("x", fit_router(emb, {"a1": train["a1"], "zz": train["a2"]}))
    wrong = fit_router(torch.nn.Embedding(len(tok), 7), {"a1": train["a1"], "a2": train["a2"]})
    with pytest.raises(ValueError, match="7-dim"):
        engine.add_router("y", wrong)
    (tmp_path / "bad").mkdir()
    with pytest.raises(AdapterFileError, match="router.json"):
        engine.add_router("z", tmp_path / "bad")
    with pytest.raises(ValueError, match="at least two"):
        fit_router(emb, {"a1": train["a1"]})
    with pytest.raises(ValueError, match="kind"):
        fit_router(emb, train, kind="knn")


def test_server_and_cli_route(monkeypatch, base, tok, adapters, tmp_path, capsys):
    from fastapi.testclient import TestClient

    import loraplex.models
    import loraplex.serving.server as server_mod
    from loraplex.cli.main import main
    from loraplex.models import LoadedModel

    monkeypatch.setattr(loraplex.models, "load_model", lambda spec: LoadedModel(copy.deepcopy(base), tok, "tiny",
                                                                               "causal-lm", None))
    assert main(["route", "--model", "tiny", "--output", str(tmp_path / "r"), "--n", "40", "--n-test", "10",
                 *[a for n, t in TASKS.items() for a in ("--adapter", f"{n}={t}")]]) == 0
    out = capsys.readouterr().out
    assert "held-out routing accuracy" in out and "all" in out
    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda engine, **kw: seen.update(engine=engine, **kw))
    assert main(["serve", "--model", "tiny", *[a for n in TASKS for a in ("--adapter", f"{n}={adapters[n]}")],
                 "--router", f"tasks={tmp_path / 'r'}"]) == 0
    engine = seen["engine"]
    with TestClient(server_mod.create_app(engine)) as client:
        assert "route:tasks" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        ex = load_data("sort", "test", 1, 0)[0]
        text = tok.decode(prompt_ids(tok, ex), skip_special_tokens=False)
        r = client.post("/v1/completions", json={"model": "route:tasks", "prompt": prompt_ids(tok, ex),
                                                 "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["adapter"] == "a4" and r.json()["model"] == "route:tasks"
        r = client.post("/v1/completions", json={"model": "route:other", "prompt": text, "max_tokens": 2})
        assert r.status_code == 404 and "no router named 'other'" in r.json()["error"]["message"]
    assert json.loads((tmp_path / "r" / "router.json").read_text())["adapters"] == list(TASKS)
    assert main(["route", "--model", "tiny", "--output", str(tmp_path / "x"), "--adapter", "a1=dates"]) == 2
