"""Weight-only quantized decoding on the CPU: a Llama-style LM, float32 against int8 and
int4 weights, through ``ds.compile_decoder(...).generate``.

The model is a randomly initialised Llama with SmolLM2-135M's shapes (30 layers, hidden
576, 9 query and 3 key/value heads, vocabulary 49152, tied embeddings). Each engine is
compiled twice: with decoding's linears streaming the int weights through the C kernel
(``deepseek.backends.cpu.weightonly``, the default) and with that kernel off (the float
weight made once, then a float GEMV: what weight-only engines ran before). The time of
one decoding step is that of a 41-token ``generate`` less a 1-token one, over 40;
contenders interleaved, medians of the rounds. Greedy tokens are checked against the
eager quantized module's.

    python -m benchmarks.weight_only_cpu --threads 2 --out benchmarks/results/weight_only_cpu.json
"""

from __future__ import annotations

import statistics
import time

import torch

import deepseek as ds
from benchmarks import cpu_run_setup, save_json


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def main(argv=None) -> int:
    from deepseek.backends.cpu import weightonly
    from deepseek.quantization import QuantConfig, Quantizer

    a, info = cpu_run_setup(__doc__, ["smollm2_shapes"], 3, argv)
    torch.manual_seed(0)
    model = _model()
    ids = torch.randint(0, 49152, (1, 8))
    variants = {"fp32": model}
    for bits, granularity in ((8, "per_channel"), (4, "per_group")):
        config = QuantConfig(weight_bits=bits, activation_bits=None, granularity=granularity,
                             group_size=64)
        variants[f"int{bits}"] = Quantizer(config).quantize(model)

    def generate(engine, n):
        t = time.perf_counter()
        out = engine.generate(ids, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, out

    engines, same = {}, {}
    rows = weightonly.MAX_ROWS
    with torch.no_grad():
        for name, m in variants.items():
            for kernel in (("stream", "float") if name != "fp32" else ("float",)):
                weightonly.MAX_ROWS = rows if kernel == "stream" else 0  # read when a step compiles
                key = f"{name}_{kernel}" if name != "fp32" else name
                engines[key] = ds.compile_decoder(m, max_seq_len=128, backend="cpu")
                _, tokens = generate(engines[key], 41)  # compiles prefill and step
                same[key] = bool(torch.equal(tokens, m.generate(ids, max_new_tokens=41,
                                                                do_sample=False)))
        weightonly.MAX_ROWS = rows
        samples = {k: [] for k in engines}
        for _ in range(a.iters):
            for k, e in engines.items():
                samples[k].append(generate(e, 41)[0] - generate(e, 1)[0])
    step_ms = {k: statistics.median(v) / 40 * 1e3 for k, v in samples.items()}
    print(f"\nLlama (SmolLM2-135M shapes), batch 1, ms per decoding step (tokens as eager's)")
    for k, ms in step_ms.items():
        print(f"  {k:<14} {ms:8.2f} ms  {step_ms['fp32'] / ms:5.2f}x fp32  {same[k]}")
    if a.out:
        save_json(a.out, {"machine": info, "results": {"step_ms": step_ms,
                                                       "tokens_equal_eager": same}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
