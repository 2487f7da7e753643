"""`loraplex` command line: train, eval, generate, chat, merge, inspect, tasks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("loraplex")

TRAIN_HELP = {
    "model": "model to fine-tune: 'smollm2' (embedded, default), 'minilm', a .gguf file, a local Hugging Face "
             "folder, or a hub id (needs network)",
    "data": "built-in task name (see `loraplex tasks`) or a JSONL/CSV file with prompt/completion or messages",
    "method": "adapter method (see `loraplex methods`)",
    "recipe": "training recipe (see `loraplex recipes`)",
    "recipe_options": "recipe-specific settings (in YAML: a mapping; on the command line: --recipe-option K=V)",
    "r": "adapter rank", "alpha": "adapter scale numerator (scale = alpha/r)", "dropout": "adapter input dropout",
    "targets": "modules to adapt: all-linear, a regex, or comma-separated names",
    "rslora": "rank-stabilised scaling alpha/sqrt(r)", "dora": "weight-decomposed LoRA (DoRA)",
    "init": "adapter init: kaiming, gaussian or random",
    "method_options": "method-specific settings (in YAML: a mapping; on the command line: --method-option K=V)",
    "steps": "optimizer steps", "epochs": "epochs over the training data (overrides --steps)",
    "batch_size": "sequences per micro-batch", "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate", "weight_decay": "AdamW weight decay", "warmup_steps": "linear warm-up steps",
    "schedule": "learning-rate schedule after warm-up: cosine, linear or constant",
    "max_grad_norm": "gradient clipping norm", "train_samples": "training examples drawn from a built-in task",
    "eval_samples": "held-out examples for scoring", "eval_every": "score the held-out set every N steps (0: only "
    "before and after)", "eval_batch_size": "rows per generation batch when scoring",
    "max_length": "longest sequence in tokens; longer examples are an error",
    "calibration_batches": "training batches shown to data-driven initialisations (EVA, LoRA-GA, ...)",
    "checkpoint_every": "write a checkpoint every N steps (also on Ctrl-C / SIGTERM)",
    "output": "output folder (adapter, log, loss.png, report.json, report.md)",
    "resume": "continue the run in --output from its last checkpoint",
    "overwrite": "start over even if --output holds a run", "seed": "seed for data, init and dropout",
    "bf16": "bf16 autocast on the CPU (slow where the CPU lacks bf16 matmuls)",
    "skip_bad_lines": "skip malformed data lines (reported) instead of stopping",
    "base_eval": "score the base model before training",
}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field, default None so that only flags actually given override the config file."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = TRAIN_HELP.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in ("method_options", "recipe_options"):
            flag = "--" + f.name[:-1].replace("_", "-")
            parser.add_argument(flag, dest=f.name, action="append", metavar="KEY=VALUE", default=None,
                                help=help_text)
        elif hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
        else:
            kind = {int: int, float: float}.get(hints[f.name], str)
            if f.name == "epochs":
                kind = float
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=f"{help_text} (default: {default})")


def build_train_config(args: argparse.Namespace):
    from loraplex.training.loop import TrainConfig

    values: dict[str, Any] = {}
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise SystemExit(f"error: cannot read config file {args.config}: {err}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {args.config} must hold a mapping of option: value")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise SystemExit(f"error: {args.config}: unknown option(s) {unknown}; known: {sorted(known)}")
        values.update(loaded)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name in ("method_options", "recipe_options"):
            options = dict(values.get(f.name) or {})
            for item in value:
                key, sep, raw = item.partition("=")
                if not sep:
                    flag = "--" + f.name[:-1].replace("_", "-")
                    raise SystemExit(f"error: {flag} expects KEY=VALUE, got {item!r}")
                options[key] = yaml.safe_load(raw)
            value = options
        values[f.name] = value
    if isinstance(values.get("targets"), str) and "," in values["targets"]:
        values["targets"] = [t.strip() for t in values["targets"].split(",") if t.strip()]
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


# --- commands ---
def cmd_train(args: argparse.Namespace) -> int:
    from loraplex.training.loop import TrainingInterrupted, train

    cfg = build_train_config(args)
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
        return 0
    try:
        report = train(cfg)
    except TrainingInterrupted as stop:
        log.warning("%s", stop)
        return 130
    base = "n/a" if report["base_score"] is None else f"{report['base_score']:.1f}%"
    print(f"\nheld-out exact match on {report['data']}: base {base} -> adapter {report['adapter_score']:.1f}% "
          f"after {report['steps']} steps ({report['train_seconds']:.0f} s)")
    print(f"adapter, log, loss curve and report in {cfg.output}/")
    return 0


def _load_with_adapters(model_spec: str | None, adapters: list[str], weights: list[float] | None):
    from loraplex.core.io import load
    from loraplex.models import load_model

    loaded = load_model(model_spec)
    model = loaded.model
    names = []
    for spec in adapters or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or "adapter", spec
        model = load(model, path, name=name)
        names.append(name)
    if names:
        if weights is not None and len(weights) != len(names):
            raise SystemExit(f"error: {len(weights)} --weight values for {len(names)} adapters")
        model.set_active(names, weights)
    model.eval()
    return loaded, model, names


def cmd_eval(args: argparse.Namespace) -> int:
    from loraplex.data import load_data
    from loraplex.training.evaluate import exact_match_score, perplexity

    loaded, model, names = _load_with_adapters(args.model, args.adapter, args.weight)
    examples = load_data(args.data, args.split, args.n, args.seed, skip_bad_lines=args.skip_bad_lines)
    result: dict[str, Any] = {"model": loaded.source, "adapters": names or None, "data": args.data,
                              "split": args.split, "n": len(examples)}
    if args.metric in ("exact_match", "all"):
        result["exact_match"] = exact_match_score(model, loaded.tokenizer, examples, batch_size=args.batch_size,
                                                  progress=True)["exact_match"]
    if args.metric in ("perplexity", "all"):
        result["perplexity"] = perplexity(model, loaded.tokenizer, examples)
    print(json.dumps(result, indent=2))
    return 0


def _prompt_ids(tokenizer, text: str, raw: bool) -> list[int]:
    from loraplex.data import Example
    from loraplex.data.tokenize import prompt_ids

    if raw:
        return list(tokenizer(text)["input_ids"])
    return prompt_ids(tokenizer, Example(prompt=text, completion=""))


def cmd_generate(args: argparse.Namespace) -> int:
    from loraplex.training.evaluate import generate

    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or prompts on standard input, one per line")
    loaded, model, _ = _load_with_adapters(args.model, args.adapter, args.weight)
    rendered = [_prompt_ids(loaded.tokenizer, p, args.raw) for p in prompts]
    outputs = generate(model, loaded.tokenizer, rendered, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature)
    for prompt, text in zip(prompts, outputs):
        print(json.dumps({"prompt": prompt, "completion": text}) if args.json else f">>> {prompt}\n{text}\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    loaded, model, names = _load_with_adapters(args.model, args.adapter, args.weight)
    tok = loaded.tokenizer
    messages: list[dict[str, str]] = []
    print(f"chatting with {loaded.source}" + (f" + {', '.join(names)}" if names else "")
          + " (empty line or Ctrl-D to quit, /reset to forget)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            kwargs = {"do_sample": args.temperature > 0, "pad_token_id": tok.pad_token_id}
            kwargs.update({"temperature": args.temperature} if args.temperature > 0
                          else {"temperature": None, "top_p": None, "top_k": None})
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, **kwargs)
        reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    if not args.adapter:
        raise SystemExit("error: give at least one --adapter PATH (or NAME=PATH) to merge")
    loaded, model, names = _load_with_adapters(args.model, args.adapter, args.weight)
    merged = model.merge_and_unload()
    out = Path(args.output)
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"merged {', '.join(names)} into {loaded.source}; wrote a Hugging Face model folder to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from loraplex.inspect import inspect_adapter, plot_spectra

    info = inspect_adapter(args.path, top_k=args.top_k)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"method: {info['method']}  rank: {info['r']}  alpha: {info['alpha']}  "
              f"scale: {info['scale']:.4g}  dora: {info['dora']}  rslora: {info['rslora']}")
        print(f"targets: {info['targets']}")
        print(f"layers: {len(info['layers'])}  parameters: {info['parameters']:,}")
        print(f"{'layer':60s} {'shape':>12s} {'rank':>4s} {'‖ΔW‖_F':>10s}  top singular values")
        for row in info["layers"]:
            sv = " ".join(f"{v:.3g}" for v in row["singular_values"])
            print(f"{row['path']:60s} {row['shape']:>12s} {row['r']:>4d} {row['delta_norm']:>10.4g}  {sv}")
    if args.plot:
        plot_spectra(info, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from loraplex.data import TASKS, task_split

    for name, task in TASKS.items():
        ex = task_split(name, "train", 1, seed=args.seed)[0]
        print(f"{name}: {task.description}\n    prompt:     {ex.prompt!r}\n    completion: {ex.completion!r}\n")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from loraplex.methods import available
    from loraplex.tools.methods_doc import method_info, write_page

    if args.markdown:
        page = Path(args.markdown)
        write_page(page, page.with_suffix(".json"))
        print(f"wrote {page} (measured results from {page.with_suffix('.json')}; measure with "
              "`python -m loraplex.tools.methods_doc --measure`)")
        return 0
    for name, cls in sorted(available().items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        info = method_info(name, cls)
        print(f"{name:12s} mergeable={info['mergeable']!s:5s} serving={info['serving_form']:26s} "
              f"{doc[0] if doc else ''}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from loraplex.training.recipes import available

    for name, cls in sorted(available().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        options = ", ".join(f"{k}={v!r}" for k, v in cls.options.items())
        print(f"{name:18s} {doc[0] if doc else ''}" + (f"  [options: {options}]" if options else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from loraplex.models import load_model
    from loraplex.serving.engine import Engine
    from loraplex.serving.server import serve

    token = args.admin_token or os.environ.get("LORAPLEX_ADMIN_TOKEN") or None
    loaded = load_model(args.model)
    if loaded.kind != "causal-lm":
        raise SystemExit(f"error: {loaded.source} is not a causal LM; `serve` generates text")
    name = args.served_model_name or (args.model or "smollm2")
    engine = Engine(loaded.model, loaded.tokenizer, model_name=name, max_active=args.max_active,
                    max_cached=max(args.max_cached, args.max_active), max_batch=args.max_batch,
                    max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens,
                    max_new_tokens=args.max_tokens)
    for spec in args.adapter or []:
        adapter_name, sep, path = spec.partition("=")
        if not sep:
            adapter_name, path = Path(spec).name or "adapter", spec
        engine.add_adapter(adapter_name, path)
    for folder in args.adapter_dir or []:
        engine.add_adapter_dir(folder)
    for spec in args.router or []:
        router_name, sep, path = spec.partition("=")
        if not sep:
            router_name, path = Path(spec).name, spec
        engine.add_router(router_name, path)
    names = engine.adapter_names()
    log.info("serving %s with %d adapter(s) on http://%s:%d (admin endpoints %s)", name, len(names), args.host,
             args.port, "on" if token else "off")
    serve(engine, host=args.host, port=args.port, admin_token=token, request_timeout=args.request_timeout)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    """Compress then Serve: a shared basis for a set of adapters; held-out exact match before and after."""
    import torch

    from loraplex.data import TASKS, load_data
    from loraplex.models import load_model
    from loraplex.serving.adapters import base_modules, read_adapter
    from loraplex.serving.compress import compress
    from loraplex.serving.engine import Engine
    from loraplex.serving.evaluate import exact_match_served

    specs: list[tuple[str, Path]] = []
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        specs.append((name, Path(path)) if sep else (Path(spec).name, Path(spec)))
    for folder in args.adapter_dir:
        if not Path(folder).is_dir():
            raise ValueError(f"--adapter-dir {folder}: no such folder")
        specs += [(sub.name, sub) for sub in sorted(Path(folder).iterdir()) if (sub / "adapter_config.json").exists()]
    if not specs:
        raise ValueError("give the adapters to compress: --adapter NAME=PATH (repeatable) or --adapter-dir DIR")
    if args.rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {args.rank}")
    tasks: dict[str, str] = {}
    for spec in args.task:
        name, sep, task = spec.partition("=")
        if not sep or name not in dict(specs):
            raise ValueError(f"--task {spec!r}: use NAME=TASK with NAME one of the adapters {[n for n, _ in specs]}")
        tasks[name] = task
    for name, _ in specs:
        if name not in tasks and name in TASKS:
            tasks[name] = name
    loaded = load_model(args.model)
    modules = base_modules(loaded.model)
    hosts = [read_adapter(path, name, modules, torch.float32) for name, path in specs]
    log.info("compressing %d adapters into a shared basis of rank %d", len(hosts), args.rank)
    cset = compress(hosts, args.rank, iters=args.iters, normalize=not args.no_normalize, name=Path(args.output).name)
    report = cset.report
    report["adapters"] = {name: {"path": str(path), "ranks": host.ranks, "task": tasks.get(name)}
                          for (name, path), host in zip(specs, hosts)}
    cset.save(args.output)
    if tasks and args.n > 0:
        examples = {name: load_data(task, "test", args.n, args.seed) for name, task in tasks.items()}
        total = sum(len(e) for e in examples.values())
        engine = Engine(loaded.model, loaded.tokenizer, max_active=len(hosts), max_cached=len(hosts),
                        max_batch=args.batch_size, max_queue=total + 1, prefill_per_step=args.batch_size)
        for name, path in specs:
            if name in tasks:
                engine.add_adapter(name, path)
        before = exact_match_served(engine, loaded.tokenizer, {n: (n, ex) for n, ex in examples.items()})
        for name in list(engine.pool.names()):
            engine.remove_adapter(name, wait=10)
        engine.add_compressed(args.output)
        after = exact_match_served(engine, loaded.tokenizer, {n: (n, ex) for n, ex in examples.items()})
        report["exact_match"] = {n: {"task": tasks[n], "examples": len(examples[n]), "before": before[n],
                                     "after": after[n]} for n in examples}
    saved = report["original_bytes"] - report["compressed_bytes"]
    report["saved_bytes"] = saved
    cset.save(args.output)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    mib = 2 ** 20
    print(f"compressed {len(hosts)} adapters on {report['layers']} layers into {args.output} (basis rank "
          f"{args.rank})")
    print(f"{'adapter':16s} {'task':10s} {'rel. error':>10s} {'EM before':>10s} {'EM after':>9s}")
    em = report.get("exact_match", {})
    for name, _ in specs:
        row = em.get(name)
        before = f"{row['before']:9.1f}%" if row else f"{'-':>10s}"
        after = f"{row['after']:8.1f}%" if row else f"{'-':>9s}"
        print(f"{name:16s} {tasks.get(name) or '-':10s} {report['relative_error'][name]:10.4f} {before} {after}")
    print(f"memory: adapters {report['original_bytes'] / mib:.2f} MiB -> compressed {report['compressed_bytes'] / mib:.2f}"
          f" MiB (shared bases {report['shared_bytes'] / mib:.2f} MiB + {report['per_adapter_bytes'] / 1024:.1f} KiB "
          f"per adapter); saved {saved / mib:.2f} MiB ({100 * saved / report['original_bytes']:.1f}%)")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Fit a MiLoRA-style prompt router over adapters from their tasks' prompts; held-out routing accuracy."""
    from loraplex.data import load_data
    from loraplex.data.tokenize import prompt_ids
    from loraplex.models import load_model
    from loraplex.serving.routing import fit_router, prompt_features

    pairs = []
    for spec in args.adapter:
        name, sep, task = spec.partition("=")
        if not sep or not name or not task:
            raise ValueError(f"--adapter {spec!r}: use NAME=TASK (the adapter's name and a task name or data file)")
        pairs.append((name, task))
    if len(pairs) < 2:
        raise ValueError("a router needs at least two adapters: --adapter NAME=TASK, repeated")
    loaded = load_model(args.model)
    tok = loaded.tokenizer
    emb = loaded.model.get_input_embeddings()
    train = {n: [prompt_ids(tok, ex) for ex in load_data(t, "train", args.n, args.seed)] for n, t in pairs}
    router = fit_router(emb, train, kind=args.kind, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    router.save(args.output)
    hits, total = 0, 0
    print(f"router ({args.kind}) over {len(pairs)} adapters -> {args.output}; held-out routing accuracy:")
    for k, (name, task) in enumerate(pairs):
        test = [prompt_ids(tok, ex) for ex in load_data(task, "test", args.n_test, args.seed)]
        picked = router.probabilities(prompt_features(emb, test)).argmax(1)
        right = int((picked == k).sum())
        hits, total = hits + right, total + len(test)
        print(f"  {name:16s} {task:12s} {100 * right / len(test):6.1f}% of {len(test)}")
    print(f"  {'all':29s} {100 * hits / total:6.1f}%")
    return 0


def _adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model (default: embedded smollm2)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter folder (PEFT format), repeatable")
    p.add_argument("--weight", action="append", type=float, default=None,
                   help="weight of each --adapter, in order (default 1 each)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Low-rank adapters: train, evaluate, merge, "
                                     "inspect. Run `loraplex train` to fine-tune the embedded SmolLM2.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model with an adapter (default: SmolLM2 on the dates task)",
                       description="Fine-tune with an adapter. Options come from defaults, then --config YAML, "
                       "then flags.")
    p.add_argument("--config", help="YAML file of train options (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    _add_dataclass_flags(p, __import__("loraplex.training.loop", fromlist=["TrainConfig"]).TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="score a model with or without adapters on a task or file")
    _adapter_args(p)
    p.add_argument("--data", default="dates", help="task name or JSONL/CSV file")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=100, help="number of examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="exact_match", choices=["exact_match", "perplexity", "all"])
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--skip-bad-lines", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate completions for prompts")
    _adapter_args(p)
    p.add_argument("--prompt", action="append", help="prompt text, repeatable (default: read stdin lines)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model and adapters")
    _adapter_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("merge", help="merge adapters into the base and write a Hugging Face model folder")
    _adapter_args(p)
    p.add_argument("--output", required=True, help="folder for the merged model (safetensors)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="show an adapter's method, ranks, norms and singular values")
    p.add_argument("path", help="adapter folder")
    p.add_argument("--plot", metavar="PNG", help="write the singular-value spectra to a PNG")
    p.add_argument("--top-k", type=int, default=4, help="singular values shown per layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("tasks", help="list the built-in tasks with a sample of each")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("recipes", help="list the training recipes (--recipe NAME)")
    p.set_defaults(func=cmd_recipes)
    p = sub.add_parser("methods", help="list the adapter methods")
    p.add_argument("--markdown", metavar="FILE", help="write the methods page (paper, parameters, serving form, "
                   "measured exact match from FILE's .json) instead of listing")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("serve", help="OpenAI-compatible server for the base model and many adapters",
                       description="Serve one base model and many adapters over HTTP (/v1/completions, "
                       "/v1/chat/completions with the adapter chosen by `model`). Needs the serve extra "
                       "(fastapi, uvicorn).")
    p.add_argument("--model", default=None, help="base model (default: embedded smollm2)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter folder (PEFT format), repeatable; read and checked at start")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="folder of adapter folders, each served under its folder name (read on first use)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin-token", default=None,
                   help="bearer token for the admin endpoints (default: $LORAPLEX_ADMIN_TOKEN; none: disabled)")
    p.add_argument("--served-model-name", default=None, help="name of the base model in the API (default: --model)")
    p.add_argument("--max-active", type=int, default=8, help="adapters on the compute device at once")
    p.add_argument("--max-cached", type=int, default=64, help="adapters kept in host memory")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: context length)")
    p.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds before a request fails with 504")
    p.add_argument("--router", action="append", default=[], metavar="NAME=PATH",
                   help="prompt router (from `loraplex route`) served as model 'route:NAME', repeatable")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("route", help="fit a prompt router choosing among adapters (MiLoRA-style routing)",
                       description="Fit a router that picks, once per request and from its prompt, the adapter "
                       "to serve it with. `loraplex serve --router NAME=DIR` serves it as model 'route:NAME'.")
    p.add_argument("--model", default=None, help="base model (default: embedded smollm2)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=TASK",
                   help="an adapter's name and its task (built-in name or data file), repeatable")
    p.add_argument("--output", required=True, help="folder for the router")
    p.add_argument("--kind", default="centroid", choices=["centroid", "linear"])
    p.add_argument("--top-k", type=int, default=1, help="adapters mixed per request (weights from the router)")
    p.add_argument("--temperature", type=float, default=0.05, help="softmax temperature of the centroid router")
    p.add_argument("--n", type=int, default=200, help="training prompts per task")
    p.add_argument("--n-test", type=int, default=50, help="held-out prompts per task for the accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("compress", help="compress a set of adapters into a shared basis (Compress then Serve)",
                       description="Joint compression of LoRA adapters: per layer a shared orthonormal basis U, V "
                       "and a small R x R matrix per adapter (ΔW_i ≈ U Σ_i Vᵀ). Reports the reconstruction error, "
                       "each task's held-out exact match before and after (served by the engine), and the memory "
                       "saved. `loraplex serve --adapter-dir` serves the output folder directly.")
    p.add_argument("--model", default=None, help="base model (default: embedded smollm2)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="adapter folder (PEFT format, plain LoRA/rsLoRA), repeatable")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR", help="folder of adapter folders")
    p.add_argument("--rank", type=int, required=True, help="rank R of the shared basis")
    p.add_argument("--output", required=True, help="folder for the compressed set")
    p.add_argument("--iters", type=int, default=10, help="alternating fit iterations (default 10)")
    p.add_argument("--no-normalize", action="store_true",
                   help="fit the raw updates (default: each adapter's update scaled to unit norm for the fit)")
    p.add_argument("--task", action="append", default=[], metavar="NAME=TASK",
                   help="task (built-in name or data file) scoring adapter NAME; adapters named after a "
                   "built-in task are scored on it")
    p.add_argument("--n", type=int, default=50, help="held-out examples per task (0: no exact match)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="requests decoded together while scoring")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_compress)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from loraplex.core.io import AdapterFileError
    from loraplex.models import ModelLoadError

    try:
        return args.func(args)
    except (AdapterFileError, ModelLoadError, OSError, ValueError, KeyError) as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
