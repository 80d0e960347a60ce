"""``localkv``: the command line. Each subcommand is a small function over the library API.

Exit codes: 0 success; 2 a user error (one ``error:`` line on stderr, no traceback unless ``--debug``);
1 an internal fault.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from .errors import UserError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="embedded model name, GGUF file or Hugging Face directory (default: smollm2-135m)")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctx", default="8K", help="context size in tokens: 8192, 8K, 128K, 1M (default 8K)")
    p.add_argument("--policy", default=None, help="KV policy (default: exact; `localkv policies` lists them)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: the GPU if there is one)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--gpu-mem", default=None, help="KV budget on the GPU, e.g. 4GB (default: what is free)")
    p.add_argument("--cpu-mem", default=None,
                   help="KV budget in pinned CPU memory, e.g. 16GB (default: 60%% of free RAM)")
    p.add_argument("--disk", default=None, metavar="DIR",
                   help="directory for the disk tier (default: $LOCALKV_HOME/kv, used only when needed)")
    p.add_argument("--kv-dtype", default=None, help="dtype of the stored KV: fp32, fp16, bf16 (default: --dtype)")
    p.add_argument("--policy-opt", default=None, metavar="KEY=VALUE,...",
                   help="the policy's options, comma-separated: budget=1/16,rank=128 (`localkv policies`)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localkv", description="Chat with a local LLM over a long context.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"localkv {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="chat with a model, or answer one --prompt")
    _add_model_options(run)
    _add_run_options(run)
    run.add_argument("--prompt", default=None, help="answer this prompt and exit ('-' reads standard input)")
    run.add_argument("--system", default=None, help="system prompt")
    run.add_argument("--max-tokens", type=int, default=512, help="most tokens per reply (default 512)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--min-p", type=float, default=0.0)
    run.add_argument("--repeat-penalty", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--no-tui", action="store_true", help="plain line-by-line chat instead of the app")
    run.add_argument("--session", default=None, metavar="PATH",
                     help="a chat session directory: resumed when it holds one, else started; saved there after "
                          "every reply and every minute of a long prefill (its KV included, so the same document "
                          "is not prefilled twice)")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="what would live where for a model and context, and how fast")
    _add_model_options(plan)
    _add_run_options(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    pull = sub.add_parser("pull", help="download an embedded model into the cache")
    pull.add_argument("name", nargs="?", default="smollm2-135m")
    pull.set_defaults(func=cmd_pull)

    info = sub.add_parser("info", help="describe a model: architecture, parameters, context, template")
    _add_model_options(info)
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser("bench", help="decode and prefill speed per context and policy, against the floor")
    _add_model_options(bench)
    bench.add_argument("--shape", default=None, help="a named architecture with random weights instead of MODEL: "
                       "llama3-8b, llama3.2-1b, smollm2-135m")
    bench.add_argument("--ctx", default="2K", help="contexts, comma-separated: 32K,128K,1M (default 2K)")
    bench.add_argument("--policy", default=None, help="policies, comma-separated (default: exact; "
                       "`localkv policies` lists them)")
    bench.add_argument("--budget", default=None, help="budget= of the sparse policies, comma-separated: 2048, 1/16, "
                       "default")
    bench.add_argument("--policy-opt", default=None, metavar="KEY=VALUE,...", help="options of every sparse "
                       "policy's rows, comma-separated: rank=128,sink_tokens=16 (louiskv.tau=0.8: one policy's only)")
    bench.add_argument("--gpu-mem", default=None, help="KV budget on the GPU, e.g. 4GB (default: what is free)")
    bench.add_argument("--cpu-mem", default=None, help="KV budget in pinned CPU memory, e.g. 16GB")
    bench.add_argument("--gpu-cap", default=None, help="cap this process's GPU memory, e.g. 24GB (a gaming card)")
    bench.add_argument("--disk", default=None, metavar="DIR", help="directory for the disk tier (its read speed "
                       "is measured too)")
    bench.add_argument("--peer", default=None, help="add a peer's rows: hf (transformers, full and offloaded cache)")
    bench.add_argument("--synthetic-kv", action="store_true", help="write random KV into the tiers instead of "
                       "a real prefill (prefill speed is then not measured)")
    bench.add_argument("--steps", type=int, default=32, help="decode steps measured (default 32)")
    bench.add_argument("--warmup", type=int, default=3, help="decode steps run before measuring (default 3)")
    bench.add_argument("--prefill-chunk", type=int, default=None, help="prefill chunk in tokens (default 4096 "
                       "on a GPU, 512 on a CPU)")
    bench.add_argument("--json", default=None, metavar="PATH", help="result file (default: next to --plot, or "
                       "bench-results/bench-DATE.json)")
    bench.add_argument("--plot", default=None, metavar="PATH", help="PNG of ms/token against context (default: "
                       "next to the JSON)")
    bench.add_argument("--device", default=None, help="cuda, cpu, ... (default: the GPU if there is one)")
    bench.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on GPU, fp32 on CPU)")
    bench.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="fidelity of sparse policies to exact attention, on text you give")
    _add_model_options(ev)
    ev.add_argument("--text", nargs="+", required=True, metavar="FILE", help="text files, read in order as one text")
    ev.add_argument("--ctx", default="4K", help="contexts, comma-separated: 4K,8K (default 4K)")
    ev.add_argument("--continuation", type=int, default=128, help="tokens scored after each context (default 128)")
    ev.add_argument("--policy", default=None, help="policies, comma-separated (default: every sparse one)")
    ev.add_argument("--budget", default="1/32,1/16,1/8", help="budget= of the sparse policies, comma-separated: "
                    "tokens (2048), shares of the context (1/16) or 'default'; default 1/32,1/16,1/8")
    ev.add_argument("--policy-opt", default=None, metavar="KEY=VALUE,...", help="more options of every sparse "
                    "policy's rows, comma-separated: sink_tokens=16 (louiskv.tau=0.8: one policy's only)")
    ev.add_argument("--gpu-mem", default=None, help="KV budget on the GPU (the device's memory on a CPU), e.g. "
                    "64MB: with --cpu-mem and --disk, runs every policy over the tiers")
    ev.add_argument("--cpu-mem", default=None, help="KV budget in (pinned) CPU memory, e.g. 16MB")
    ev.add_argument("--disk", default=None, metavar="DIR", help="directory for the disk tier")
    ev.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    ev.add_argument("--calibrate", action="store_true", help="first fit the policies that calibrate (louiskv's "
                    "tau) to the model on the first context, stored beside the model cache for later runs")
    ev.add_argument("--device", default=None, help="cuda, cpu, ... (default: the GPU if there is one)")
    ev.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on GPU, fp32 on CPU)")
    ev.set_defaults(func=cmd_eval)

    pol = sub.add_parser("policies", help="the KV policies and their options")
    pol.add_argument("name", nargs="?", default=None, help="one policy's options (default: every policy)")
    pol.set_defaults(func=cmd_policies)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _validate_run(args) -> None:
    if args.max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature cannot be negative, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")


def _policy_options(text: str | None, policy: str | None = None) -> dict:
    """``--policy-opt exact_keys=false,rank=128`` -> ``{"exact_keys": False, "rank": 128}``: true/false, none,
    integers, decimals and fractions (1/16) become Python values, anything else stays a string (index_tier=cpu)."""
    options = {}
    for item in _split(text):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise UserError(f"--policy-opt wants KEY=VALUE pairs, got {item!r}")
        options[key] = _option_value(value)
    if policy is not None:
        from .offload import policies

        policies.get(policy).parse(options)   # an unknown policy or option fails before any loading
    return options


def _option_value(text: str):
    from .units import parse_budget

    if text.lower() in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[text.lower()]
    if "/" in text:
        return parse_budget(text)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cmd_run(args) -> int:
    from . import api
    from .units import parse_tokens

    _validate_run(args)
    parse_tokens(args.ctx)  # a bad --ctx fails before any loading
    options = _policy_options(args.policy_opt, args.policy)
    prompt = None
    if args.prompt is not None:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt.strip():
            raise UserError("the prompt is empty")
    llm = api.load(args.model, ctx=args.ctx, policy=args.policy, device=args.device, dtype=args.dtype,
                   gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem, disk=args.disk, kv_dtype=args.kv_dtype,
                   session=args.session, policy_options=options)
    options = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                   top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty)
    if prompt is not None:
        if args.session is not None:   # through the saved chat: its KV reused, the reply saved with it
            chat = llm.chat(system=args.system)
            _say_pending(chat)
            events = chat.send(prompt, **options)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}]
            events = llm.stream(messages, **options)
        for event in events:
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    print(f"plan: {llm.plan.line()}", file=sys.stderr)  # interactive runs only: --prompt keeps stderr quiet
    if not args.no_tui and sys.stdout.isatty() and sys.stdin.isatty():
        from .tui.app import run_app

        return run_app(llm, system=args.system, options=options)
    from .tui.repl import run_repl

    return run_repl(llm, system=args.system, options=options)


def _say_pending(chat) -> None:
    pending = chat.session.pending
    if pending:
        print(f"session: a message's prefill was interrupted ({chat.context_tokens:,} tokens kept); sending it "
              f"again continues from there", file=sys.stderr)


def cmd_plan(args) -> int:
    import json
    from pathlib import Path

    from .models.hub import home
    from .models.loader import default_dtype, parse_device, parse_dtype, read_model_args
    from .offload.disk import check_writable
    from .offload.planner import make_plan
    from .units import parse_bytes, parse_tokens

    from .offload import policies

    ctx = parse_tokens(args.ctx)
    policy = args.policy or policies.DEFAULT
    options = _policy_options(args.policy_opt, policy)
    if args.disk:
        check_writable(Path(args.disk).expanduser())
    model_args, path, _, _ = read_model_args(args.model)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    kv_dtype = parse_dtype(args.kv_dtype) if args.kv_dtype else dtype
    plan = make_plan(model_args, ctx, model=path.name, policy=policy, device=device, kv_dtype=kv_dtype,
                     weights_bytes=model_args.n_params() * dtype.itemsize,
                     gpu_mem=parse_bytes(args.gpu_mem) if args.gpu_mem else None,
                     cpu_mem=parse_bytes(args.cpu_mem) if args.cpu_mem else None,
                     disk=args.disk, default_disk=home() / "kv", options=options)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0


def cmd_pull(args) -> int:
    from .models.hub import pull

    path = pull(args.name)
    print(path)
    return 0


def cmd_info(args) -> int:
    from .models.loader import describe

    for key, value in describe(args.model).items():
        print(f"{key:<18} {value}")
    return 0


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _result_paths(json_path: str | None, plot_path: str | None) -> tuple[Path, Path]:
    import time

    if json_path is None and plot_path is None:
        json_path = f"bench-results/bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    json_file = Path(json_path).expanduser() if json_path else Path(plot_path).expanduser().with_suffix(".json")
    plot_file = Path(plot_path).expanduser() if plot_path else json_file.with_suffix(".png")
    for path in {json_file.parent, plot_file.parent}:
        _check_results_dir(path)
    return json_file, plot_file


def _check_results_dir(path: Path) -> None:
    """Fail before a run, not after it, when its results cannot be written."""
    from .offload.disk import check_writable

    try:
        check_writable(path)
    except UserError:
        raise UserError(f"cannot write results under {path}: not a writable directory") from None


def _budgets(text: str | None) -> list[tuple[str, int | float | None]]:
    """--budget of bench and eval: (label, value) pairs, "default" meaning the policy's own (None)."""
    from .units import parse_budget

    return [(b, None if b == "default" else parse_budget(b)) for b in _split(text)]


def cmd_bench(args) -> int:
    from .bench import BenchConfig, plot_result, run_bench, table, write_json
    from .offload import policies
    from .units import parse_bytes, parse_tokens

    if args.model and args.shape:
        raise UserError("give a MODEL or a --shape, not both")
    size = lambda text: parse_bytes(text) if text else None  # noqa: E731
    config = BenchConfig(
        ctxs=[parse_tokens(c) for c in _split(args.ctx)], policies=_split(args.policy or policies.DEFAULT),
        model=args.model,
        shape=args.shape, budgets=_budgets(args.budget),
        options=_policy_options(args.policy_opt),
        gpu_mem=size(args.gpu_mem), cpu_mem=size(args.cpu_mem), gpu_cap=size(args.gpu_cap),
        disk=Path(args.disk).expanduser() if args.disk else None, peers=_split(args.peer),
        synthetic_kv=args.synthetic_kv, steps=args.steps, warmup=args.warmup, prefill_chunk=args.prefill_chunk,
        device=args.device, dtype=args.dtype)
    if not config.ctxs or not config.policies:
        raise UserError("--ctx and --policy need at least one value each")
    json_file, plot_file = _result_paths(args.json, args.plot)
    command = "localkv " + " ".join(args.argv)

    def save(result: dict) -> None:  # after every row: a long run interrupted keeps what it measured
        result["meta"]["command"] = command
        write_json(result, json_file)

    result = run_bench(config, progress=lambda line: print(line, file=sys.stderr, flush=True), checkpoint=save)
    save(result)
    plot_result(result, plot_file)
    print(f"wrote {json_file} and {plot_file}", file=sys.stderr)
    print(table(result))
    return 0


def cmd_eval(args) -> int:
    from . import api
    from .eval import calibrate, fidelity, fidelity_table, read_texts, sparse_policies
    from .units import parse_tokens

    text = read_texts(args.text)
    ctxs = [parse_tokens(c) for c in _split(args.ctx)]
    if not ctxs or args.continuation <= 0:
        raise UserError("--ctx needs a value and --continuation must be positive")
    policies = _split(args.policy) or sparse_policies()
    budgets = _budgets(args.budget)
    options = _policy_options(args.policy_opt)
    out = Path(args.json).expanduser() if args.json else None
    if out is not None:
        _check_results_dir(out.parent)
    llm = api.load(args.model, ctx=max(ctxs) + args.continuation + 1, device=args.device, dtype=args.dtype,
                   gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem, disk=args.disk)
    ids = llm.engine.encode_raw(text)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.calibrate:
        fitted = calibrate(llm, ids, ctxs[0], args.continuation, policies, progress=say)
        for policy, (opts, path) in fitted.items():
            shown = {k: (f"{min(v):.3f}..{max(v):.3f} over {len(v)} layers" if isinstance(v, list) else v)
                     for k, v in opts.items()}
            say(f"{policy}: calibrated {', '.join(f'{k} {v}' for k, v in shown.items())} (saved to {path})")
        if not fitted:
            say(f"none of {', '.join(policies)} calibrates: nothing stored")
    rows = fidelity(llm, ids, ctxs, args.continuation, policies, budgets,
                    progress=say, options=options)
    if out is not None:
        import json

        result = {"model": llm.loaded.source.name, "text": args.text, "rows": rows}
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(fidelity_table(rows))
    return 0


def cmd_policies(args) -> int:
    from .offload import policies

    for name in [policies.get(args.name).name] if args.name else policies.names():
        spec = policies.get(name)
        default = " (default)" if name == policies.DEFAULT else ""
        print(f"{name}{default}: {spec.summary}")
        for option, value, doc in spec.option_help():
            print(f"  {option}={value}  {doc}")
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a fault of ours: say so, point at --debug
        if args.debug:
            traceback.print_exc()
        print(f"error: internal fault: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
