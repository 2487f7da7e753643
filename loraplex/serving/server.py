"""OpenAI-compatible HTTP server over the multi-adapter `Engine` (FastAPI + uvicorn).

    loraplex serve --model smollm2 --adapter sql=runs/sql/adapter --adapter-dir adapters/ --admin-token T

Endpoints:

* `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI request and response shapes; the
  adapter is chosen by `model` (an adapter name, or the base model's name for none). Extension: an
  `"adapters": {"name": weight, ...}` field serves a weighted mix (then `model` is the base name).
  `"stream": true` streams server-sent events ending with `data: [DONE]`.
* `GET /v1/models`: the base model, every adapter (members of compressed sets included) and every
  prompt router as `route:<name>`. A request with `model: "route:<name>"` is served by the adapter(s)
  that router picks from its prompt, once (MiLoRA-style); the choice is returned as `choices[i].adapter`.
* `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}`, `POST /v1/unload_lora_adapter`
  `{"lora_name"}`, `GET /v1/adapters`: admin, `Authorization: Bearer <token>` (401 without it, 403
  with a wrong one or when the server has no admin token).
* `GET /health`, `GET /metrics` (Prometheus text format).

Errors are `{"error": {"message", "type", "param", "code"}}` with a 4xx status for anything the client
can fix: malformed JSON (400), unknown model (404), prompt too long or bad parameters (400), queue full
(429), adapter file not safetensors or not fitting the base (400), and 504 when a request times out.
The server keeps serving after every one of them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.core.io import AdapterFileError
from loraplex.serving.adapters import AdapterNotFound
from loraplex.serving.engine import Completion, Engine, InvalidRequest, QueueFull, SamplingParams

log = logging.getLogger("loraplex.serving")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


class Metrics:
    """Counters and a latency histogram, rendered with the engine's gauges in Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_n = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1
            if endpoint.startswith("/v1/") and "completions" in endpoint:
                i = next((k for k, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
                self.latency_counts[i] += 1
                self.latency_sum += seconds
                self.latency_n += 1

    def render(self, engine: Engine) -> str:
        stats = engine.stats()
        c = stats["counters"]
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_num(value)}")

        with self._lock:
            reqs = sorted(self.requests.items())
            counts, total, n = list(self.latency_counts), self.latency_sum, self.latency_n
        metric("loraplex_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [(f'{{endpoint="{e}",status="{s}"}}', v) for (e, s), v in reqs])
        cumulative, samples = 0, []
        for bound, count in zip([*LATENCY_BUCKETS, math.inf], counts):
            cumulative += count
            samples.append((f'_bucket{{le="{"+Inf" if bound == math.inf else bound}"}}', cumulative))
        samples += [("_sum", total), ("_count", n)]
        lines.append("# HELP loraplex_request_latency_seconds Time to answer a completion request (streams: "
                     "until the first byte).")
        lines.append("# TYPE loraplex_request_latency_seconds histogram")
        lines += [f"loraplex_request_latency_seconds{suffix} {_num(v)}" for suffix, v in samples]
        reasons = sorted(k[len("finished_"):] for k in c if k.startswith("finished_"))
        metric("loraplex_finished_requests_total", "counter", "Requests finished, by reason.",
               [(f'{{reason="{r}"}}', c[f"finished_{r}"]) for r in reasons])
        metric("loraplex_rejected_requests_total", "counter", "Requests refused because the queue was full.",
               [("", c.get("rejected_queue_full", 0))])
        metric("loraplex_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", c.get("prompt_tokens", 0))])
        metric("loraplex_generated_tokens_total", "counter", "Tokens generated.",
               [("", c.get("generated_tokens", 0))])
        metric("loraplex_engine_steps_total", "counter", "Engine steps that ran the model.", [("", c.get("steps", 0))])
        metric("loraplex_engine_step_seconds_total", "counter", "Time spent in engine steps.",
               [("", stats["step_seconds"])])
        metric("loraplex_queue_length", "gauge", "Requests waiting to be admitted.", [("", stats["waiting"])])
        metric("loraplex_running_requests", "gauge", "Requests in the running batch.", [("", stats["running"])])
        metric("loraplex_adapters", "gauge", "Adapters by tier.",
               [('{state="registered"}', stats["registered_adapters"]), ('{state="cached"}', stats["cached"]),
                ('{state="active"}', stats["active"])])
        metric("loraplex_adapter_bytes", "gauge", "Bytes held by adapter weights, by tier.",
               [('{tier="host"}', stats["host_bytes"]), ('{tier="device"}', stats["device_bytes"])])
        metric("loraplex_adapter_loads_total", "counter", "Adapters read from disk.", [("", stats["adapter_loads"])])
        metric("loraplex_adapter_load_failures_total", "counter", "Adapter reads that failed.",
               [("", stats["adapter_load_failures"])])
        metric("loraplex_adapter_activations_total", "counter", "Adapters installed on the compute device.",
               [("", c.get("adapter_activations", 0))])
        metric("loraplex_adapter_evictions_total", "counter", "Adapters evicted from the compute device (LRU).",
               [("", c.get("adapter_evictions", 0))])
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def create_app(engine: Engine, *, admin_token: str | None = None, request_timeout: float = 300.0,
               max_body_bytes: int = 4 << 20, manage_engine: bool = True):
    """The FastAPI app. With `manage_engine` the engine's thread starts and stops with the app."""
    from contextlib import asynccontextmanager

    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()

    app = FastAPI(title="loraplex", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    def error_response(err: HTTPError) -> JSONResponse:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001
            log.exception("unhandled error on %s", request.url.path)
            response = error_response(HTTPError(500, "internal server error", "server_error"))
        route = request.scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        metrics.observe(endpoint, response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(HTTPError)
    async def on_http_error(request: Request, err: HTTPError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request: Request, err: StarletteHTTPException):
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(HTTPError(err.status_code, str(err.detail), type_))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError):
        return error_response(HTTPError(400, f"invalid request: {err.errors()}"))

    async def body_of(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise HTTPError(413, f"request body is {declared} bytes; the limit is {max_body_bytes}")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise HTTPError(413, f"request body is {len(raw)} bytes; the limit is {max_body_bytes}")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        return data

    def check_admin(request: Request) -> None:
        header = request.headers.get("authorization")
        if not header:
            raise HTTPError(401, "admin endpoint: send 'Authorization: Bearer <admin token>'", "authentication_error",
                            headers={"WWW-Authenticate": "Bearer"})
        if not admin_token:
            raise HTTPError(403, "admin endpoints are disabled: start the server with --admin-token "
                                 "(or LORAPLEX_ADMIN_TOKEN)", "permission_error")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), admin_token.encode()):
            raise HTTPError(403, "invalid admin token", "permission_error")

    # ------------------------------------------------------------------ info
    @app.get("/health")
    async def health():
        ok = engine.running or not manage_engine
        body = {"status": "ok" if ok else "engine stopped", "model": engine.model_name,
                "running": len(engine.rows), "waiting": engine.queue_length(),
                "adapters": len(engine.pool.names())}
        if engine.last_error:
            body["last_error"] = engine.last_error
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [{"id": engine.model_name, "object": "model", "created": now, "owned_by": "loraplex",
                 "root": engine.model_name, "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "loraplex", "root": n,
                  "parent": engine.model_name} for n in engine.adapter_names() + engine.router_names()]
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ admin
    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        check_admin(request)
        data = await body_of(request)
        name, path = data.get("lora_name"), data.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise HTTPError(400, "give lora_name and lora_path (strings)")
        if engine.pool.is_registered(name):
            raise HTTPError(409, f"an adapter named {name!r} is loaded already; unload it first", code="conflict")
        try:
            info = await asyncio.to_thread(engine.add_adapter, name, path)
        except AdapterFileError as err:
            raise HTTPError(400, str(err), param="lora_path") from None
        except ValueError as err:
            status = 409 if any(w in str(err) for w in ("already", "still in use", "taken")) else 400
            raise HTTPError(status, str(err), param="lora_name") from None
        return {"status": "loaded", **info}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        check_admin(request)
        data = await body_of(request)
        name = data.get("lora_name")
        if not isinstance(name, str) or not name:
            raise HTTPError(400, "give lora_name (a string)")
        try:
            await asyncio.to_thread(engine.remove_adapter, name, wait=5.0)
        except AdapterNotFound as err:
            raise HTTPError(404, str(err), "not_found_error", code="model_not_found") from None
        except ValueError as err:      # a member of a compressed set: unload the set
            raise HTTPError(400, str(err), param="lora_name") from None
        return {"status": "unloaded", "name": name, "memory": engine.memory()}

    @app.get("/v1/adapters")
    async def list_adapters(request: Request):
        check_admin(request)
        return {"adapters": engine.adapters(), "memory": engine.memory()}

    # ------------------------------------------------------------------ generation
    def sampling(data: dict, default_max_tokens: int = 16) -> SamplingParams:
        for key, bad in (("n", lambda v: v not in (None, 1)), ("best_of", lambda v: v not in (None, 1)),
                         ("echo", lambda v: bool(v)), ("logprobs", lambda v: v not in (None, False, 0)),
                         ("suffix", lambda v: v is not None)):
            if key in data and bad(data[key]):
                raise HTTPError(400, f"{key}={data[key]!r} is not supported by this server", param=key)
        max_tokens = data.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = data.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, engine.max_new_tokens)
        stop = data.get("stop") or ()
        params = SamplingParams(max_tokens=max_tokens, temperature=data.get("temperature", 1.0)
                                if data.get("temperature") is not None else 1.0,
                                top_p=data.get("top_p", 1.0) if data.get("top_p") is not None else 1.0,
                                seed=data.get("seed"), stop=[stop] if isinstance(stop, str) else stop,
                                ignore_eos=bool(data.get("ignore_eos", False)))
        try:
            params.check(engine.max_new_tokens)
        except InvalidRequest as err:
            raise HTTPError(400, str(err)) from None
        return params

    def adapter_choice(data: dict) -> tuple[str, Any]:
        model = data.get("model", engine.model_name)
        if model is None:
            model = engine.model_name
        if not isinstance(model, str):
            raise HTTPError(400, "model must be a string", param="model")
        mix = data.get("adapters")
        if mix is not None:
            if model not in (engine.model_name, ""):
                raise HTTPError(400, "with 'adapters' (a weighted mix), set model to the base model "
                                     f"{engine.model_name!r}", param="adapters")
            if not isinstance(mix, dict) or not mix:
                raise HTTPError(400, "adapters must be an object of adapter name -> weight", param="adapters")
            return model, mix
        return model, (None if model in (engine.model_name, "") else model)

    def submit(prompt_ids: list[int], adapter: Any, params: SamplingParams, listener) -> Any:
        try:
            return engine.submit(prompt_ids, adapter, params, timeout=request_timeout, listener=listener)
        except AdapterNotFound as err:
            raise HTTPError(404, str(err), "not_found_error", code="model_not_found", param="model") from None
        except QueueFull as err:
            raise HTTPError(429, str(err), "rate_limit_error", headers={"Retry-After": "1"}) from None
        except InvalidRequest as err:
            raise HTTPError(400, str(err)) from None

    def listen() -> tuple[asyncio.Queue, Any]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        return events, listener

    def completion_error(c: Completion) -> HTTPError:
        if c.finish_reason == "timeout":
            return HTTPError(504, f"the request timed out after {request_timeout:g} s", "timeout_error")
        status = {"invalid_adapter": 400, "adapter_unloaded": 404}.get(c.error_type or "", 500)
        type_ = "server_error" if status == 500 else "invalid_request_error"
        return HTTPError(status, c.error or "generation failed", type_)

    async def wait_done(events: asyncio.Queue, handle) -> Completion:
        try:
            while True:
                kind, payload = await asyncio.wait_for(events.get(), timeout=request_timeout + 30)
                if kind == "done":
                    return payload
        except (asyncio.TimeoutError, asyncio.CancelledError):
            handle.cancel()
            raise

    def encode_prompt(prompt: Any) -> list[list[int]]:
        tok = engine.tokenizer
        if isinstance(prompt, str):
            return [list(tok(prompt)["input_ids"])]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [list(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return [ids for p in prompt for ids in encode_prompt(p)]
        raise HTTPError(400, "prompt must be a string, a list of strings, a list of token ids, or a list of those",
                        param="prompt")

    def routed(c: Completion) -> dict:
        """Extension field: which adapter(s) a "route:<router>" request was served with."""
        return {} if c.routed is None else {"adapter": c.routed}

    def usage(cs: list[Completion]) -> dict:
        p, g = sum(c.prompt_tokens for c in cs), sum(c.completion_tokens for c in cs)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.post("/v1/completions")
    async def completions(request: Request):
        data = await body_of(request)
        model, adapter = adapter_choice(data)
        params = sampling(data)
        if "prompt" not in data:
            raise HTTPError(400, "prompt is required", param="prompt")
        prompts = encode_prompt(data["prompt"])
        stream = bool(data.get("stream"))
        if stream and len(prompts) != 1:
            raise HTTPError(400, "streaming takes a single prompt", param="prompt")
        if len(prompts) > 64:
            raise HTTPError(400, "at most 64 prompts per request", param="prompt")
        cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if not stream:
            subs = []
            try:
                for ids in prompts:
                    events, listener = listen()
                    subs.append((events, submit(ids, adapter, _copy(params), listener)))
            except HTTPError:
                for _, h in subs:     # all or nothing
                    h.cancel()
                raise
            done = await asyncio.gather(*(wait_done(e, h) for e, h in subs))
            for c in done:
                if c.error is not None or c.finish_reason == "timeout":
                    raise completion_error(c)
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None,
                                 **routed(c)} for i, c in enumerate(done)], "usage": usage(done)}
        events, listener = listen()
        handle = submit(prompts[0], adapter, params, listener)
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

        async def gen():
            try:
                while True:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=request_timeout + 30)
                    if kind == "delta":
                        yield sse(chunk(payload, None))
                        continue
                    c: Completion = payload
                    if c.error is not None or c.finish_reason == "timeout":
                        err = completion_error(c)
                        yield sse({"error": {"message": err.message, "type": err.type, "code": err.status}})
                    else:
                        yield sse(chunk("", c.finish_reason))
                        if include_usage:
                            yield sse({"id": cid, "object": "text_completion", "created": created, "model": model,
                                       "choices": [], "usage": usage([c])})
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if not handle.done():
                    handle.cancel()

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        data = await body_of(request)
        model, adapter = adapter_choice(data)
        ids = chat_prompt(data.get("messages"))
        params = sampling(data, default_max_tokens=max(1, min(256, engine.context_length - len(ids))))
        stream = bool(data.get("stream"))
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        events, listener = listen()
        handle = submit(ids, adapter, params, listener)
        if not stream:
            c = await wait_done(events, handle)
            if c.error is not None or c.finish_reason == "timeout":
                raise completion_error(c)
            return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason, "logprobs": None, **routed(c)}],
                    "usage": usage([c])}
        include_usage = bool((data.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

        async def gen():
            try:
                yield sse(chunk({"role": "assistant", "content": ""}, None))
                while True:
                    kind, payload = await asyncio.wait_for(events.get(), timeout=request_timeout + 30)
                    if kind == "delta":
                        yield sse(chunk({"content": payload}, None))
                        continue
                    c: Completion = payload
                    if c.error is not None or c.finish_reason == "timeout":
                        err = completion_error(c)
                        yield sse({"error": {"message": err.message, "type": err.type, "code": err.status}})
                    else:
                        yield sse(chunk({}, c.finish_reason))
                        if include_usage:
                            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                       "model": model, "choices": [], "usage": usage([c])})
                    yield "data: [DONE]\n\n"
                    return
            finally:
                if not handle.done():
                    handle.cancel()

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def chat_prompt(messages: Any) -> list[int]:
        tok = engine.tokenizer
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise HTTPError(400, f"messages[{i}] must be an object with a string role", param="messages")
            content = m.get("content")
            if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise HTTPError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise HTTPError(400, f"messages[{i}].content must be a string", param="messages")
            clean.append({"role": m["role"], "content": content})
        if not getattr(tok, "chat_template", None):
            raise HTTPError(400, "this model's tokenizer has no chat template; use /v1/completions")
        try:
            text = tok.apply_chat_template(clean, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - template errors are the client's messages
            raise HTTPError(400, f"the chat template rejected the messages: {err}", param="messages") from None
        return list(tok(text, add_special_tokens=False)["input_ids"])

    return app


def _copy(params: SamplingParams) -> SamplingParams:
    import copy

    return copy.copy(params)


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000, admin_token: str | None = None,
          request_timeout: float = 300.0, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(engine, admin_token=admin_token, request_timeout=request_timeout)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
