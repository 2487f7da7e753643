"""Multi-adapter serving: the engine against per-request `generate`, paging, the HTTP server.

Everything runs on a tiny random Llama with a character tokenizer built in-process. The reference
for every engine answer is the same request served alone by Hugging Face `generate` on an
`AdapterModel` holding the same adapter files (loaded by the core `load`, an independent code path).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from tiny import char_tokenizer, tiny_llama

from loraplex.core.config import LoraConfig
from loraplex.core.io import AdapterFileError, load
from loraplex.serving import Engine, SamplingParams, StepPlan
from loraplex.serving.adapters import read_adapter
from loraplex.serving.layers import LoraWeights, PlanContext, ServingModule
from loraplex.training.evaluate import generate

PROMPTS = ["hello world", "abc", "The quick brown fox", "zz", "lorem ipsum dolor sit", "x=1;", "SELECT *", "ok?"]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: extra threads only spin against each other on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def base(tok):
    model = tiny_llama(len(tok), seed=0)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.config.eos_token_id = tok.eos_token_id
    return model


def make_adapter(base, folder: Path, *, seed: int, r: int, targets="all-linear", dora=False, rslora=False,
                 modules_to_save=(), alpha=None, workspace=None) -> Path:
    """Save a random (non-identity) adapter; `workspace`: an AdapterModel of `base` to build it on."""
    from loraplex.core.model import AdapterModel

    model = workspace if workspace is not None else AdapterModel(copy.deepcopy(base))
    torch.manual_seed(seed)
    config = LoraConfig(r=r, alpha=alpha or 2.0 * r, init="random", targets=targets, dora=dora, rslora=rslora,
                        modules_to_save=list(modules_to_save))
    model.add_adapter("x", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:   # DoRA starts equal to LoRA; make the decomposition matter
                p.mul_(0.6 + torch.rand(p.shape))
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape))
    model.save(folder, name="x")
    model.delete_adapter("x")
    return folder


RANKS = [1, 2, 4, 8, 16]


class Adapters(dict):
    """Adapter folders by name, each written on first use: a0..a59 plain LoRA of ranks 1-16 on two target
    sets (some rsLoRA); dora1/dora2 DoRA; head with modules_to_save=[lm_head]; emb with an embedding LoRA."""

    SPECIAL = {
        "dora1": dict(seed=101, r=4, dora=True),
        "dora2": dict(seed=102, r=8, dora=True, targets=["q_proj", "o_proj", "up_proj"]),
        "head": dict(seed=103, r=4, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        "emb": dict(seed=104, r=4, targets=["embed_tokens", "k_proj", "gate_proj"]),
    }

    def __init__(self, base, root: Path) -> None:
        from loraplex.core.model import AdapterModel

        super().__init__()
        self.base, self.root = base, root
        self.workspace = AdapterModel(copy.deepcopy(base))

    def __missing__(self, name: str) -> Path:
        from unittest import mock

        if name in self.SPECIAL:
            spec = self.SPECIAL[name]
        else:
            i = int(name[1:])
            spec = dict(seed=i, r=RANKS[i % 5], targets="all-linear" if i % 3 else ["q_proj", "v_proj", "down_proj"],
                        rslora=i % 7 == 0)
        with mock.patch("os.fsync"):              # throw-away files: no need to wait for the disk
            self[name] = make_adapter(self.base, self.root / name, workspace=self.workspace, **spec)
        return self[name]


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> Adapters:
    return Adapters(base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def reference(base, tok, adapters):
    """The same request served alone: HF `generate` (batch of one) on an AdapterModel with the adapter."""
    from loraplex.core.model import AdapterModel

    model = AdapterModel(copy.deepcopy(base))
    memo: dict = {}

    def run(prompt_ids: list[int], adapter, max_tokens: int) -> str:
        key = (tuple(prompt_ids), json.dumps(adapter, sort_keys=True), max_tokens)
        for name in [] if adapter is None else [adapter] if isinstance(adapter, str) else adapter:
            if name not in model.configs:      # loaded on first use
                load(model, adapters[name], name=name)
        if key not in memo:
            if adapter is None:
                with model.disabled():
                    memo[key] = generate(model, tok, [prompt_ids], max_new_tokens=max_tokens)[0]
            else:
                names = [adapter] if isinstance(adapter, str) else sorted(adapter)
                weights = None if isinstance(adapter, str) else [adapter[n] for n in names]
                model.set_active(names, weights)
                memo[key] = generate(model, tok, [prompt_ids], max_new_tokens=max_tokens)[0]
        return memo[key]

    return run


def new_engine(base, tok, adapters=None, names=None, **kwargs) -> Engine:
    engine = Engine(copy.deepcopy(base), tok, model_name="tiny", **kwargs)
    for name in names or []:
        engine.add_adapter(name, adapters[name])
    return engine


def ids_of(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def check_against_reference(engine, tok, reference, requests, max_tokens=10):
    prompts = [ids_of(tok, p) for p, _ in requests]
    outs = engine.generate(prompts, [a for _, a in requests], SamplingParams(max_tokens=max_tokens))
    for (prompt, adapter), ids, out in zip(requests, prompts, outs):
        assert out.error is None, out.error
        assert out.text == reference(ids, adapter, max_tokens), (prompt, adapter)
    return outs


# --------------------------------------------------------------------------- the grouped layer
def test_grouped_layer_is_shrink_then_expand_per_slice():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    ctx = PlanContext()
    layer = ServingModule(base, "linear", ctx)
    factors = {}
    for name, r in (("a", 1), ("b", 3), ("c", 8)):        # different ranks, no padding
        a, b, s = torch.randn(r, 6), torch.randn(5, r), 0.5 * r
        factors[name] = (a, b, s)
        layer.add_lora(name, LoraWeights("linear", a.t().contiguous(), (s * b).t().contiguous()))
    rows = [(), (("a", 1.0),), (("a", 1.0),), (("b", 1.0),), (("a", 0.5), ("c", 2.0))]
    x = torch.randn(len(rows), 2, 6)
    ctx.plan = StepPlan(rows)
    assert [(g.start, g.stop) for g in ctx.plan.groups] == [(0, 1), (1, 3), (3, 4), (4, 5)]
    with torch.no_grad():
        out = layer(x)
        for i, terms in enumerate(rows):
            want = base(x[i])
            for name, w in terms:
                a, b, s = factors[name]
                want = want + w * s * (x[i] @ a.t()) @ b.t()
            assert torch.allclose(out[i], want, rtol=1e-5, atol=1e-6), (i, terms)  # (assert_close imports DTensor: 5 s)
    with pytest.raises(ValueError, match="contiguous"):
        StepPlan([(("a", 1.0),), (), (("a", 1.0),)])


def stacked_layer(ranks: dict[str, int], seed: int = 0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(6, 5)
    ctx = PlanContext()
    layer = ServingModule(base, "linear", ctx)
    factors = {}
    for name, r in ranks.items():
        a, b, s = torch.randn(r, 6), torch.randn(5, r), 2.0 / r
        factors[name] = (a, b, s)
        layer.add_lora(name, LoraWeights("linear", a.t().contiguous(), (s * b).t().contiguous()))
    return layer, ctx, factors


def check_rows(layer, ctx, factors, rows, tokens=2):
    ctx.plan = StepPlan(rows)
    x = torch.randn(len(rows), tokens, 6)
    with torch.no_grad():
        out = layer(x)
        for i, terms in enumerate(rows):
            want = layer.base_layer(x[i])
            for name, w in terms:
                a, b, s = factors[name]
                want = want + w * s * (x[i] @ a.t()) @ b.t()
            assert torch.allclose(out[i], want, rtol=1e-5, atol=1e-5), (i, terms)
    return ctx.plan


def test_stacked_path_serves_single_adapter_groups_with_two_batched_products():
    ranks = {f"s{i}": 2 for i in range(7)} | {f"t{i}": 3 for i in range(4)}
    layer, ctx, factors = stacked_layer(ranks)
    layer.remove_lora("s1")                               # a free slot in the middle of the rank-2 stack
    assert sorted(layer.stacks) == [2, 3] and layer.stacks[2].names.count(None) == 2
    one = lambda n, w=1.0: ((n, w),)  # noqa: E731
    rows = ([(), one("s0"), one("s0"), one("s2"), one("s3", 0.5), one("s4")] + [one("s5")] * 7   # s5: too large
            + [one("s6"), one("t0"), one("t1"), one("t2"), (("s0", 0.5), ("t3", 2.0))])
    plan = check_rows(layer, ctx, factors, rows)
    r2, r3 = plan.route(layer.stacks[2], 2), plan.route(layer.stacks[3], 2)
    served = lambda route: sorted(plan.adapted[i].terms[0][0] for i in route.groups)  # noqa: E731
    assert served(r2) == ["s0", "s2", "s4", "s6"] and r2.slots is None     # s5 (14 tokens) and s3 (weight) not
    assert served(r3) == ["t0", "t1", "t2"]
    # Few of many slots used: only those slots' factors are gathered.
    for i in range(7, 12):
        a, b = torch.randn(2, 6), torch.randn(5, 2)
        factors[f"s{i}"] = (a, b, 1.0)
        layer.add_lora(f"s{i}", LoraWeights("linear", a.t().contiguous(), b.t().contiguous()))
    plan = check_rows(layer, ctx, factors, [one("s2"), one("s9"), one("s11"), one("t0")], tokens=1)
    assert plan.route(layer.stacks[2], 1).slots is not None
    assert plan.route(layer.stacks[3], 1) is None                          # one group: per-group path


def test_stacked_route_reads_rows_in_place_when_every_slot_has_one_equal_group():
    layer, ctx, factors = stacked_layer({f"s{i}": 2 for i in range(4)})     # capacity 4, every slot used
    one = lambda n: ((n, 1.0),)  # noqa: E731
    plan = check_rows(layer, ctx, factors, [(), one("s0"), one("s1"), one("s2"), one("s3")])
    route = plan.route(layer.stacks[2], 2)
    assert route.span == (2, 10) and route.src is None                     # slot order: a view, no copies
    plan = check_rows(layer, ctx, factors, [one("s2"), one("s0"), one("s3"), one("s1"), ()])
    route = plan.route(layer.stacks[2], 2)
    assert route.span is None and route.dest is None and route.src.tolist() == [2, 3, 6, 7, 0, 1, 4, 5]
    plan = check_rows(layer, ctx, factors, [one("s0"), one("s0"), one("s1"), one("s2"), one("s3")])
    assert plan.route(layer.stacks[2], 2).dest is not None                 # unequal groups: padded block


def test_stack_slots_are_reused_and_unloading_gives_the_memory_back():
    one, _, _ = stacked_layer({"s0": 4})
    assert one.stack_bytes == 4 * (6 + 5) * 4                # one adapter: no spare slots (fp32 A and sB)
    layer, ctx, factors = stacked_layer({f"s{i}": 4 for i in range(16)})
    full = layer.stack_bytes
    assert len(layer.stacks[4].names) == 16
    for i in range(13):
        layer.remove_lora(f"s{i}")
    assert layer.stack_bytes <= full // 2                 # 3 of 16 slots used: capacity halved
    check_rows(layer, ctx, factors, [((f"s{i}", 1.0),) for i in (13, 14, 15)])
    for i in (13, 14, 15):
        layer.remove_lora(f"s{i}")
    assert layer.stack_bytes == 0 and layer.empty


# --------------------------------------------------------------------------- engine vs generate
def test_mixed_ranks_and_base_rows_match_generate(base, tok, adapters, reference):
    names = [f"a{i}" for i in range(10)]        # ranks 1..16, two target sets, rsLoRA
    engine = new_engine(base, tok, adapters, names, max_active=10, max_cached=10, max_batch=16)
    requests = [(PROMPTS[i % len(PROMPTS)], ([None] + names)[i % 11]) for i in range(22)]
    outs = check_against_reference(engine, tok, reference, requests)
    assert len({o.text for o in outs}) > 8            # adapters really change the answers
    assert engine.counters["steps"] < 22 * 10          # rows were decoded together


@pytest.mark.parametrize("trim_slack", [0, 10**6])
def test_long_generations_with_requests_joining_and_leaving(base, tok, adapters, reference, trim_slack):
    """Small batches, two prefills per step: rows leave (EOS or length) and join all the time, and the
    KV cache outgrows its first allocation. Leaving rows rebuild the cache every time (trim_slack 0), or
    never (rows move up in place, padding columns kept)."""
    names = ["a5", "a6", "a7"]
    engine = new_engine(base, tok, adapters, names, max_active=3, max_cached=3, max_batch=4, prefill_per_step=2)
    engine.trim_slack = trim_slack
    requests = [(PROMPTS[i % len(PROMPTS)], ([None] + names)[i % 4]) for i in range(9)]
    check_against_reference(engine, tok, reference, requests, max_tokens=45)


def test_dora_modules_to_save_embedding_and_mixes_in_one_batch(base, tok, adapters, reference):
    names = ["dora1", "dora2", "head", "emb", "a1", "a2"]
    engine = new_engine(base, tok, adapters, names, max_active=6, max_cached=6, max_batch=32)
    requests = [(p, a) for p in PROMPTS[:3] for a in
                [None, "dora1", "dora2", "head", "emb", "a1", {"a1": 0.5, "a2": 1.5}, {"dora1": 0.7, "a2": 1.0}]]
    check_against_reference(engine, tok, reference, requests)


def test_paging_with_fewer_device_slots_than_adapters(base, tok, adapters, reference):
    names = [f"a{i}" for i in range(12)]
    engine = new_engine(base, tok, max_active=3, max_cached=5, max_batch=8)
    for n in names:
        engine.add_adapter(n, adapters[n], preload=False)       # read on first use, in the background
    requests = [(PROMPTS[i % 4], names[(i * 5) % 12]) for i in range(30)]
    check_against_reference(engine, tok, reference, requests, max_tokens=6)
    assert engine.counters["adapter_evictions"] > 0
    assert engine.pool.loads > 5                                  # host tier evicted and re-read
    mem = engine.memory()
    assert mem["active"] <= 3 and mem["cached"] <= 5


def test_unloading_frees_adapter_memory(base, tok, adapters):
    engine = new_engine(base, tok, adapters, ["a4", "a9"], max_active=2, max_cached=2)
    engine.generate([ids_of(tok, "hi")] * 2, ["a4", "a9"], SamplingParams(max_tokens=2))
    before = engine.memory()
    one, on_device = engine.pool.get_cached("a4").nbytes, engine._active["a4"].nbytes
    assert before["active"] == 2 and before["device_bytes"] >= on_device > 0 and before["host_bytes"] >= one > 0
    probe = weakref.ref(engine._active["a4"].host.layers["model.layers.0.self_attn.q_proj"].a_t)
    engine.remove_adapter("a4", wait=5)
    gc.collect()
    after = engine.memory()
    assert after["host_bytes"] == before["host_bytes"] - one
    assert after["device_bytes"] == before["device_bytes"] - on_device and after["active"] == 1
    assert probe() is None                                      # nothing keeps the tensors alive
    # no wrapper left holding it; wrappers with nothing left are removed from the model
    assert all("a4" not in w.lora for w in engine.served.wrappers.values())
    engine.remove_adapter("a9", wait=5)
    assert not engine.served.wrappers
    assert not any(isinstance(m, ServingModule) for m in engine.served.model.modules())


def test_loading_runs_in_the_background_without_stalling_the_batch(base, tok, adapters, monkeypatch):
    import loraplex.serving.adapters as adapters_mod

    real = adapters_mod.read_adapter
    started, release = threading.Event(), threading.Event()

    def slow_read(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    engine = new_engine(base, tok, adapters, ["a3"], max_active=4)
    engine.add_adapter("a5", adapters["a5"], preload=False)
    monkeypatch.setattr(adapters_mod, "read_adapter", slow_read)
    engine.start()
    try:
        long = engine.submit(ids_of(tok, "abc"), "a3", SamplingParams(max_tokens=40))
        deadline = time.monotonic() + 30
        while not (long.token_ids or long.done()) and time.monotonic() < deadline:
            time.sleep(0.002)
        late = engine.submit(ids_of(tok, "abc"), "a5", SamplingParams(max_tokens=3))
        assert started.wait(5)
        long.wait(30)                           # finished while a5 was still being read
        assert not late.done()
        release.set()
        assert late.wait(30).finish_reason == "length"
    finally:
        release.set()
        engine.stop()


def test_sampling_is_seeded_per_request(base, tok, adapters):
    engine = new_engine(base, tok, adapters, ["a2"])
    p = ids_of(tok, "hello")
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
    alone = engine.generate([p], ["a2"], [params])[0].text
    crowd = engine.generate([ids_of(tok, "zz"), p, p], [None, "a2", "a2"],
                            [SamplingParams(max_tokens=12, temperature=1.5, seed=1), params,
                             SamplingParams(max_tokens=12, temperature=1.5, seed=8)])
    assert crowd[1].text == alone
    assert crowd[2].text != alone
    greedy = engine.generate([p], ["a2"], [SamplingParams(max_tokens=12)])[0].text
    tiny_top_p = engine.generate([p], ["a2"], [SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6)])[0].text
    assert tiny_top_p == greedy


def test_stop_strings_streaming_and_limits(base, tok, adapters, reference):
    engine = new_engine(base, tok, adapters, ["a1"], max_prompt_tokens=32, max_new_tokens=50, max_queue=2)
    p = ids_of(tok, "hello world")
    full = reference(p, "a1", 12)
    stop = full[5:7]
    deltas = []
    h = engine.submit(p, "a1", SamplingParams(max_tokens=12, stop=[stop]), listener=lambda k, v: deltas.append((k, v)))
    while not h.done():
        engine.step()
    c = h.wait()
    assert c.finish_reason == "stop" and c.text == full[:full.find(stop)]
    assert "".join(v for k, v in deltas if k == "delta") == c.text and deltas[-1][0] == "done"
    from loraplex.serving import InvalidRequest, QueueFull

    with pytest.raises(InvalidRequest, match="limit is 32"):
        engine.submit(list(range(5, 45)), None)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.submit(p, None, SamplingParams(max_tokens=51))
    engine.submit(p, None)
    engine.submit(p, None)
    with pytest.raises(QueueFull):
        engine.submit(p, None)
    # cancelling (a streaming client went away) frees the row and the adapter's reference
    engine3 = new_engine(base, tok, adapters, ["a1"])
    h = engine3.submit(p, "a1", SamplingParams(max_tokens=30))
    engine3.step()
    assert len(engine3.rows) == 1 and engine3._refs["a1"] == 1
    h.cancel()
    engine3.step()
    assert h.wait(1).finish_reason == "cancelled" and not engine3.rows and engine3._refs["a1"] == 0
    # ignore_eos: exactly max_tokens tokens, EOS or not
    eos_first = engine3.generate([p], ["a1"], [SamplingParams(max_tokens=20, ignore_eos=True)])[0]
    assert eos_first.completion_tokens == 20 and eos_first.finish_reason == "length"
    # timeouts: a request whose deadline passed in the queue finishes with reason "timeout"
    engine2 = new_engine(base, tok)
    late = engine2.submit(p, None, SamplingParams(max_tokens=5), timeout=0.0)
    time.sleep(0.01)
    engine2.step()
    assert late.wait(1).finish_reason == "timeout"


def test_adapters_that_do_not_fit_are_refused(base, tok, adapters, tmp_path):
    from loraplex.serving.adapters import base_modules

    modules = base_modules(base)
    # made for another base model: a wider Llama
    other = tiny_llama(len(tok), seed=3, hidden=48)
    wrong = make_adapter(other, tmp_path / "wide", seed=1, r=2)
    with pytest.raises(AdapterFileError, match="do not fit"):
        read_adapter(wrong, "wide", modules, torch.float32)
    # names modules the base does not have at all
    import shutil

    from safetensors.torch import load_file, save_file
    renamed = tmp_path / "renamed"
    shutil.copytree(adapters["a1"], renamed)
    state = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("model.layers", "encoder.block"): v for k, v in state.items()},
              renamed / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="matches no module"):
        read_adapter(renamed, "renamed", modules, torch.float32)
    # pickled weights are never read
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["a1"], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickled"):
        read_adapter(pickled, "pickled", modules, torch.float32)
    # not a safetensors file
    garbage = tmp_path / "garbage"
    shutil.copytree(adapters["a1"], garbage)
    (garbage / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(AdapterFileError, match="safetensors"):
        read_adapter(garbage, "garbage", modules, torch.float32)
    # the engine refuses it at registration and keeps nothing
    engine = new_engine(base, tok)
    with pytest.raises(AdapterFileError):
        engine.add_adapter("wide", wrong)
    assert engine.pool.names() == []
    # a lazily registered bad adapter fails its requests with a clear message, the engine keeps serving
    engine.add_adapter("garbage", garbage, preload=False)
    bad, good = engine.generate([ids_of(tok, "a"), ids_of(tok, "a")], ["garbage", None], SamplingParams(max_tokens=2))
    assert bad.finish_reason == "error" and "cannot be loaded" in bad.error and bad.error_type == "invalid_adapter"
    assert good.finish_reason == "length"


# --------------------------------------------------------------------------- server
ADMIN = "s3cret"


@pytest.fixture
def client_for(base, tok, adapters):
    from fastapi.testclient import TestClient

    made = []

    def make(names=("a1", "a2", "head"), token=ADMIN, **kwargs):
        from loraplex.serving.server import create_app

        server_kwargs = {k: kwargs.pop(k) for k in ("request_timeout", "manage_engine") if k in kwargs}
        engine = new_engine(base, tok, adapters, list(names), **kwargs)
        client = TestClient(create_app(engine, admin_token=token, **server_kwargs))
        client.__enter__()
        made.append(client)
        return client, engine

    yield make
    for c in made:
        c.__exit__(None, None, None)


def sse_events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_server_completions_chat_streaming_models_health_metrics(client_for, tok, reference):
    client, engine = client_for()
    assert client.get("/health").json()["status"] == "ok"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny", "a1", "a2", "head"]

    p = "hello world"
    for model, adapter in (("tiny", None), ("a1", "a1"), ("head", "head")):
        r = client.post("/v1/completions", json={"model": model, "prompt": p, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == reference(ids_of(tok, p), adapter, 8)
        assert body["model"] == model and body["usage"]["completion_tokens"] == 8
    mix = {"a1": 0.5, "a2": 1.5}
    r = client.post("/v1/completions", json={"model": "tiny", "adapters": mix, "prompt": [p, "abc"],
                                             "max_tokens": 6, "temperature": 0})
    assert [c["text"] for c in r.json()["choices"]] == [reference(ids_of(tok, q), mix, 6) for q in (p, "abc")]

    # streaming: the deltas add up to the non-streamed answer
    r = client.post("/v1/completions", json={"model": "a2", "prompt": p, "max_tokens": 8, "temperature": 0,
                                             "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 8
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == reference(ids_of(tok, p), "a2", 8)

    messages = [{"role": "user", "content": "hi there"}]
    chat_ids = list(tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"])
    r = client.post("/v1/chat/completions", json={"model": "a1", "messages": messages, "max_tokens": 7,
                                                  "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": reference(chat_ids, "a1", 7)}
    r = client.post("/v1/chat/completions", json={"model": "a1", "messages": messages, "max_tokens": 7,
                                                  "temperature": 0, "stream": True})
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == reference(chat_ids, "a1", 7)

    text = client.get("/metrics").text
    for name in ("loraplex_http_requests_total{", "loraplex_generated_tokens_total", "loraplex_queue_length",
                 "loraplex_adapters{state=\"active\"}", "loraplex_request_latency_seconds_bucket",
                 "loraplex_adapter_bytes{tier=\"host\"}"):
        assert name in text, name


def test_server_error_paths_and_keeps_serving(client_for, adapters, tmp_path):
    client, engine = client_for(max_prompt_tokens=40, max_new_tokens=20)

    def ok():
        r = client.post("/v1/completions", json={"model": "a1", "prompt": "abc", "max_tokens": 2})
        assert r.status_code == 200, r.text

    def err(r, status, words):
        assert r.status_code == status, r.text
        message = r.json()["error"]["message"]
        assert words in message, message
        ok()

    post = client.post
    err(post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400,
        "not valid JSON")
    err(post("/v1/completions", json=[1, 2]), 400, "JSON object")
    err(post("/v1/completions", json={"model": "nope", "prompt": "a"}), 404, "no adapter or model named 'nope'")
    err(post("/v1/completions", json={"model": "tiny", "prompt": "a" * 100}), 400, "limit is 40")
    err(post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 21}), 400, "limit of 20")
    err(post("/v1/completions", json={"model": "tiny", "prompt": "a", "temperature": -1}), 400, "temperature")
    err(post("/v1/completions", json={"model": "tiny", "prompt": "a", "n": 2}), 400, "not supported")
    err(post("/v1/completions", json={"model": "tiny"}), 400, "prompt is required")
    err(post("/v1/completions", json={"model": "tiny", "prompt": {"x": 1}}), 400, "prompt must be")
    err(post("/v1/completions", json={"model": "a1", "adapters": {"a1": 1}, "prompt": "a"}), 400, "base model")
    err(post("/v1/completions", json={"model": "tiny", "adapters": {"zz": 1}, "prompt": "a"}), 404, "'zz'")
    err(post("/v1/completions", json={"model": "tiny", "adapters": {"head": 0.5}, "prompt": "a"}), 400,
        "modules_to_save")
    err(post("/v1/chat/completions", json={"model": "tiny", "messages": "hi"}), 400, "messages")
    err(post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": 3}]}), 400,
        "content")
    err(client.get("/v1/nothing"), 404, "Not Found")

    # admin: 401 without a token, 403 with a wrong one
    body = {"lora_name": "a7", "lora_path": str(adapters["a7"])}
    err(post("/v1/load_lora_adapter", json=body), 401, "Bearer")
    err(post("/v1/load_lora_adapter", json=body, headers={"Authorization": "Bearer wrong"}), 403, "invalid")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    err(post("/v1/load_lora_adapter", json={"lora_name": "x"}, headers=auth), 400, "lora_path")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters["a7"] / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    err(post("/v1/load_lora_adapter", json={"lora_name": "p", "lora_path": str(pickled)}, headers=auth), 400,
        "pickled")
    wide = make_adapter(tiny_llama(len(char_tokenizer()), seed=3, hidden=48), tmp_path / "wide", seed=1, r=2)
    err(post("/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": str(wide)}, headers=auth), 400,
        "do not fit")
    err(post("/v1/load_lora_adapter", json={"lora_name": "a1", "lora_path": str(adapters["a7"])}, headers=auth),
        409, "loaded already")
    err(post("/v1/unload_lora_adapter", json={"lora_name": "zz"}, headers=auth), 404, "no adapter")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny", "a1", "a2", "head"]

    # load, use, unload, gone
    r = post("/v1/load_lora_adapter", json=body, headers=auth)
    assert r.status_code == 200 and r.json()["bytes"] > 0, r.text
    assert post("/v1/completions", json={"model": "a7", "prompt": "abc", "max_tokens": 2}).status_code == 200
    listing = client.get("/v1/adapters", headers=auth).json()
    assert {a["name"]: a["state"] for a in listing["adapters"]}["a7"] == "active"
    r = post("/v1/unload_lora_adapter", json={"lora_name": "a7"}, headers=auth)
    assert r.status_code == 200 and r.json()["memory"]["active"] <= 3
    err(post("/v1/completions", json={"model": "a7", "prompt": "abc"}), 404, "'a7'")


def test_server_admin_disabled_queue_full_and_timeout(client_for, tok):
    client, engine = client_for(token=None)
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/nope"},
                    headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]

    client, engine = client_for(max_queue=1, manage_engine=False)   # nobody steps this engine
    engine.submit(ids_of(tok, "a"), None)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"

    client, engine = client_for(request_timeout=0.0)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 5})
    assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


# --------------------------------------------------------------------------- load test on loopback
def load_test(base, tok, adapters, reference, n_requests: int, n_adapters: int, max_active: int, max_cached: int):
    """`n_requests` concurrent HTTP requests on 127.0.0.1 over `n_adapters` adapters (each asked several
    times, every 10th request on the bare base); every answer must equal the request served alone."""
    import httpx
    import uvicorn

    from loraplex.serving.server import create_app

    names = [f"a{i}" for i in range(n_adapters)]
    engine = new_engine(base, tok, max_active=max_active, max_cached=max_cached, max_batch=32, max_queue=1000)
    for n in names:
        engine.add_adapter(n, adapters[n], preload=False)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(1000):
            if server.started:
                break
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        jobs = [(PROMPTS[i % 4], names[i % n_adapters] if i % 10 else None) for i in range(n_requests)]

        async def run_all():
            limits = httpx.Limits(max_connections=n_requests + 10, max_keepalive_connections=n_requests + 10)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=300) as c:
                return await asyncio.gather(*(c.post("/v1/completions", json={
                    "model": a or "tiny", "prompt": p, "max_tokens": 8, "temperature": 0}) for p, a in jobs))

        start = time.perf_counter()
        responses = asyncio.run(run_all())
        elapsed = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(10)
    assert len(responses) == len(jobs)
    for (p, a), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference(ids_of(tok, p), a, 8), (p, a)
    assert engine.counters["finished_length"] + engine.counters["finished_stop"] == len(jobs)
    assert engine.counters["submitted"] == len(jobs)
    assert engine.counters["adapter_evictions"] > 0
    print(f"\n{len(jobs)} concurrent requests over {len(names)} adapters in {elapsed:.1f} s "
          f"({engine.counters['generated_tokens'] / elapsed:.0f} tokens/s, {engine.counters['steps']} steps)")


def test_concurrent_requests_on_loopback(base, tok, adapters, reference):
    load_test(base, tok, adapters, reference, n_requests=48, n_adapters=12, max_active=4, max_cached=8)


@pytest.mark.slow
def test_load_on_loopback_240_concurrent_requests_over_60_adapters(base, tok, adapters, reference):
    load_test(base, tok, adapters, reference, n_requests=240, n_adapters=60, max_active=16, max_cached=40)


# --------------------------------------------------------------------------- command line
def test_cli_serve_wires_engine_and_token(monkeypatch, base, tok, adapters, tmp_path):
    import loraplex.models
    import loraplex.serving.server as server_mod
    from loraplex.cli.main import main
    from loraplex.models import LoadedModel

    monkeypatch.setattr(loraplex.models, "load_model", lambda spec: LoadedModel(copy.deepcopy(base), tok, "tiny",
                                                                               "causal-lm", None))
    seen = {}
    monkeypatch.setattr(server_mod, "serve", lambda engine, **kw: seen.update(engine=engine, **kw))
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", "from-env")
    folder = tmp_path / "many"
    folder.mkdir()
    import shutil

    for n in ("a3", "a4"):
        shutil.copytree(adapters[n], folder / n)
    assert main(["serve", "--model", "tiny", "--adapter", f"one={adapters['a1']}", "--adapter-dir", str(folder),
                 "--port", "0", "--max-active", "2"]) == 0
    assert seen["admin_token"] == "from-env" and seen["host"] == "127.0.0.1"
    assert seen["engine"].pool.names() == ["one", "a3", "a4"] and seen["engine"].model_name == "tiny"
    assert main(["serve", "--model", "tiny", "--adapter", f"bad={tmp_path}"]) == 2
