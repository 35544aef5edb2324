"""GPT-2 small greedy decoding: Deepseek's compile_decoder vs transformers' generate.

Contenders, timed side by side in interleaved rounds (whole ``generate`` calls:
prefill of the prompt plus ``--new`` greedy tokens, no early stop):

- ``eager``: ``model.generate`` with transformers' default dynamic cache;
- ``static_compiled`` (CUDA only): ``generate`` with a static cache and the forward
  through ``torch.compile(mode="reduce-overhead", fullgraph=True)``;
- ``deepseek``: ``ds.compile_decoder(model, ...).generate``.

    python -m benchmarks.decode --device cpu --threads 2 --batch 1
    python -m benchmarks.decode --device cuda --batch 1,64 --out benchmarks/results/decode_h200.json

CPU runs fp32; CUDA runs bf16 weights and cache for every contender.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

import deepseek as ds
from benchmarks import save_json
from benchmarks.models import gpt2_small


def _timer(device: str):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3, out
    else:
        def run(fn):
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out
    return run


def _static_compiled(model, ids, kw: dict):
    """transformers' recipe for fast decoding: a static cache and the forward through
    ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs), on a
    copy of the model. Attention avoids cuDNN's kernel, whose compiled form failed
    here (torch 2.11: "mha_graph.execute ... is_good()")."""
    import copy

    from torch.nn.attention import SDPBackend, sdpa_kernel

    twin = copy.deepcopy(model)
    twin.forward = torch.compile(twin.forward, mode="reduce-overhead", fullgraph=True)
    config = copy.deepcopy(model.generation_config)
    config.update(cache_implementation="static", disable_compile=True, **kw)

    def run():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]):
            return twin.generate(ids, generation_config=config)

    return run


def bench(batch: int, prompt: int, new: int, device: str, iters: int) -> dict:
    model, _ = gpt2_small(1, 8)
    model.config.use_cache = True
    if device == "cuda":
        model = model.to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).to(device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    lm = ds.compile_decoder(model, max_batch_size=batch, max_seq_len=1024,
                            backend="cuda" if device == "cuda" else "cpu")
    first = lm.generate(ids, new)
    if device == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    contenders = {
        "eager": lambda: model.generate(ids, **kw),
        "deepseek": lambda: lm.generate(ids, new),
    }
    if device == "cuda":
        contenders["static_compiled"] = _static_compiled(model, ids, kw)
    run = _timer(device)
    outputs, warm_s = {}, {}
    with torch.no_grad():
        for k, fn in contenders.items():  # warm-up (torch.compile compiles here)
            t0 = time.perf_counter()
            for _ in range(2):
                outputs[k] = fn()
            warm_s[k] = time.perf_counter() - t0
        samples = {k: [] for k in contenders}
        names = list(contenders)
        for r in range(iters):
            for k in names[r % len(names):] + names[:r % len(names)]:
                samples[k].append(run(contenders[k])[0])
    med = {k: statistics.median(v) for k, v in samples.items()}
    ref = outputs["eager"][:, prompt:].cpu()
    agree = {k: float((o[:, prompt:].cpu() == ref).float().mean()) for k, o in outputs.items()}
    return {
        "model": "gpt2_small", "device": device, "batch": batch, "prompt": prompt, "new": new,
        "dtype": "bf16" if device == "cuda" else "fp32", "iters": iters,
        "median_s_per_generate": med,
        "ms_per_token": {k: v / new * 1e3 for k, v in med.items()},
        "tokens_per_s": {k: batch * new / v for k, v in med.items()},
        "deepseek_speedup_vs": {k: v / med["deepseek"] for k, v in med.items()},
        "token_agreement_with_eager": agree,
        "deepseek_compile_and_first_generate_s": compile_s,
        "warmup_s": warm_s,
        "first_equals_later": bool(torch.equal(first.cpu(), outputs["deepseek"].cpu())),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}
    if a.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    import transformers

    info["transformers"] = transformers.__version__
    print(info)
    results = []
    for b in (int(x) for x in a.batch.split(",")):
        r = bench(b, a.prompt, a.new, a.device, a.iters)
        results.append(r)
        print(f"\nbatch {b}, prompt {a.prompt}, {a.new} new tokens ({r['dtype']})")
        for k in r["ms_per_token"]:
            print(f"  {k:<16} {r['ms_per_token'][k]:8.3f} ms/token {r['tokens_per_s'][k]:10.1f} tok/s"
                  f"  deepseek {r['deepseek_speedup_vs'][k]:.2f}x  tokens = eager "
                  f"{r['token_agreement_with_eager'][k]:.3f}")
        print(f"  deepseek compile + first generate {r['deepseek_compile_and_first_generate_s']:.1f} s")
        sys.stdout.flush()
    if a.out:
        save_json(a.out, {"machine": info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
