"""Prefill and decode speed of localkv against Hugging Face transformers, same model, same prompts, one run.

    python scripts/bench_cpu.py [--model smollm2-135m] [--prompt-tokens 256,1024] [--decode-tokens 64]

Both run the same GGUF weights dequantized to fp32 on the CPU; both use greedy decoding with a KV cache
(transformers: a manual loop over ``past_key_values``, its fastest eager path). Prints a table last and
writes JSON to ``$OUT/bench_cpu.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def _time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_localkv(llm, ids: list[int], decode_tokens: int, repeat: int) -> tuple[float, float]:
    engine = llm.engine

    def prefill():
        seq = engine.new_sequence()
        engine.prefill(seq, ids)
        return seq

    prefill_s = _time(prefill, repeat)

    def decode():
        seq = engine.new_sequence()
        logits = engine.prefill(seq, ids)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            logits = engine.decode_one(seq, int(torch.argmax(logits)))
        return time.perf_counter() - t

    decode_s = statistics.median(decode() for _ in range(repeat))
    return len(ids) / prefill_s, decode_tokens / decode_s


@torch.inference_mode()
def bench_hf(model, ids: list[int], decode_tokens: int, repeat: int) -> tuple[float, float]:
    x = torch.tensor([ids])
    prefill_s = _time(lambda: model(x, use_cache=True), repeat)

    def decode():
        out = model(x, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        t = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = torch.argmax(logits).view(1, 1)
            out = model(nxt, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return time.perf_counter() - t

    decode_s = statistics.median(decode() for _ in range(repeat))
    return len(ids) / prefill_s, decode_tokens / decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", default="256,1024")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    import transformers

    import localkv
    from localkv.models.hub import resolve

    llm = localkv.load(a.model, ctx="8K", device="cpu", dtype="fp32")
    path = resolve(a.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    vocab = llm.args.vocab_size
    rows = []
    for n in [int(x) for x in a.prompt_tokens.split(",")]:
        ids = torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        ours = bench_localkv(llm, ids, a.decode_tokens, a.repeat)
        ref = bench_hf(hf, ids, a.decode_tokens, a.repeat)
        rows.append({"prompt_tokens": n, "localkv_prefill_tok_s": ours[0], "hf_prefill_tok_s": ref[0],
                     "localkv_decode_tok_s": ours[1], "hf_decode_tok_s": ref[1]})

    meta = {"command": "python scripts/bench_cpu.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                       f"(threads {torch.get_num_threads()}), transformers {transformers.__version__}",
            "date": time.strftime("%Y-%m-%d")}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_cpu.json"), "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=2)
    print(f"\n{meta['machine']}; {a.decode_tokens} decode tokens; median of {a.repeat}")
    print(f"{'prompt':>7} | {'prefill tok/s: localkv':>22} {'HF':>8} {'ratio':>6} | "
          f"{'decode tok/s: localkv':>21} {'HF':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} | {r['localkv_prefill_tok_s']:>22.1f} {r['hf_prefill_tok_s']:>8.1f} "
              f"{r['localkv_prefill_tok_s'] / r['hf_prefill_tok_s']:>5.2f}x | "
              f"{r['localkv_decode_tok_s']:>21.1f} {r['hf_decode_tok_s']:>8.1f} "
              f"{r['localkv_decode_tok_s'] / r['hf_decode_tok_s']:>5.2f}x")


if __name__ == "__main__":
    main()
