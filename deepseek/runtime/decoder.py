"""Autoregressive decoding with a KV cache kept in pre-planned buffers.

``ds.compile_decoder(causal_lm, ...)`` captures one *step* of a transformers
causal LM (GPT-2, Llama, ...) as a Deepseek graph whose inputs are the new
tokens, their positions and the whole static KV cache, and whose outputs are
the last position's logits and the updated cache. The cache inputs are
donated (``Graph.donated``), so ``schedule_inplace_ops`` turns each cache
update (``index_put``) into an in-place write: the cache never moves, a step
reads it once and writes one position into it.

One step graph is captured per (batch size, cache length) bucket; its token
dim is symbolic, so the prompt (prefill, T tokens) and each decoding step
(T = 1) are two plans of one graph sharing one cache. The cache length is
the next power of two at or above prompt + new tokens (at least 64, at most
``max_seq_len``): attention reads only that much cache, not ``max_seq_len``.
On CUDA a greedy step (plan, argmax, next position) is captured once as a
CUDA graph and replayed: the decoding loop does no host work but the replay
call and never synchronizes until the tokens are read.

Example::

    lm = ds.compile_decoder(model, max_batch_size=8, max_seq_len=1024, backend="cpu")
    tokens = lm.generate(input_ids, max_new_tokens=32)   # same tokens as model.generate
"""

from __future__ import annotations

import inspect
import logging

import torch

from deepseek.errors import DeepseekError, InputError
from deepseek.ir.graph import Graph

log = logging.getLogger(__name__)

_MIN_CACHE = 64
_MAX_PREFILL_GRAPHS = 8


class DecoderError(DeepseekError):
    """A model or call that compile_decoder / generate cannot take."""


def _cache_shape(config, batch: int, length: int) -> tuple[int, list[int]]:
    """(layers, [batch, kv heads, length, head dim]) from a transformers config."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        raise DecoderError("compile_decoder needs a transformers causal LM whose config has "
                           "num_hidden_layers, num_attention_heads and hidden_size")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, [batch, kv_heads, length, head_dim]


def _step_module(lm: torch.nn.Module) -> torch.nn.Module:
    """One decoding step of ``lm`` as a pure function of (tokens, positions, cache)."""
    from transformers.cache_utils import Cache, StaticLayer

    class FunctionalLayer(StaticLayer):
        """A static cache layer over given tensors, updated out of place (capturable)."""

        def __init__(self, keys, values, start):
            super().__init__(max_cache_len=keys.shape[2])
            self.keys, self.values, self.cumulative_length = keys, values, start
            self.device, self.dtype = keys.device, keys.dtype
            self.batch_size, self.num_heads = keys.shape[:2]
            self.k_head_dim, self.v_head_dim = keys.shape[3], values.shape[3]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            pos = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
            self.keys = self.keys.index_copy(2, pos, key_states)
            self.values = self.values.index_copy(2, pos, value_states)
            return self.keys, self.values

    params = inspect.signature(lm.forward).parameters
    # transformers 5 renamed past_key_values to cache: take whichever this version has
    cache_arg = "cache" if "cache" in params else "past_key_values"
    if cache_arg not in params or "position_ids" not in params:
        raise DecoderError(f"{type(lm).__name__}.forward takes no {cache_arg}/position_ids: "
                           "compile_decoder needs a transformers causal LM with a KV cache")
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, positions, kv):
            layers = [FunctionalLayer(kv[2 * i], kv[2 * i + 1], positions[0])
                      for i in range(len(kv) // 2)]
            out = self.lm(input_ids=input_ids, position_ids=positions[None], use_cache=True,
                          **{cache_arg: Cache(layers=layers)}, **keep)
            return (out.logits[:, -1], *[t for layer in layers for t in (layer.keys, layer.values)])

    return Step().eval()


class _Bucket:
    """The compiled step for one (batch, cache length): cache, plans, CUDA graph."""

    def __init__(self, lm: "CompiledDecoder", batch: int, length: int):
        import deepseek as ds

        layers, shape = _cache_shape(lm.config, batch, length)
        model = lm.model
        p = next(model.parameters())
        example = (torch.zeros(batch, 2, dtype=torch.long, device=p.device),
                   torch.arange(2, device=p.device),
                   tuple(torch.zeros(shape, dtype=p.dtype, device=p.device)
                         for _ in range(2 * layers)))
        graph: Graph = ds.capture(_step_module(model), example,
                                  dynamic_dims={0: {1: "tokens"}, 1: {0: "tokens"}})
        graph.donated = frozenset(v.name for v in graph.inputs[2:])
        engine = ds.compile(graph, backend=lm.backend, precision=lm.precision,
                            opt_level=lm.opt_level)
        parts = engine._parts
        if len(parts) != 1:
            raise DecoderError("compile_decoder runs the whole step on one backend; "
                               f"{engine.report().partitions} split it (pick one backend)")
        part = parts[0].graph
        if part.inputs != engine.graph.inputs:
            raise DecoderError("the step's partition reads other inputs than the step graph")
        self.engine, self.exe = engine, parts[0].executable
        self.device = torch.device(parts[0].device)
        self.batch, self.length = batch, length
        # the partition lists outputs in node order: where logits and each cache tensor are
        self.order = [next(i for i, o in enumerate(part.outputs) if o is v)
                      for v in engine.graph.outputs]
        producers = part.producers()
        # whether each cache output is its own input updated in place (else: copied back)
        self.in_place = all(
            (n := producers.get(out)) is not None and n.reuse == 0 and n.inputs[0] is inp
            for inp, out in zip(part.inputs[2:], engine.graph.outputs[1:]))
        if not self.in_place:
            log.warning("the KV cache update is not in place for this model: each step copies it")
        self.cache = [torch.zeros(shape, dtype=p.dtype, device=self.device)
                      for _ in range(2 * layers)]
        self.graph_step = None  # the CUDA graph of one greedy step, made on first use
        self.prefills: dict[int, tuple] = {}  # prompt length -> (replay, ids, positions, logits)

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of the last position; the cache updated for ``positions``."""
        inputs = [ids, positions, *self.cache]
        out = self.exe.plan_for(inputs)(inputs)
        if not self.in_place:
            for dst, i in zip(self.cache, self.order[1:]):
                dst.copy_(out[i])
        return out[self.order[0]]

    def _capture(self, body):
        """``body`` (which writes into the cache) as a CUDA graph: (replay, its result)."""
        saved = [t.clone() for t in self.cache]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: kernels chosen, workspaces allocated
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        for dst, src in zip(self.cache, saved):  # the warm-up wrote into the cache
            dst.copy_(src)
        return graph.replay, out

    def greedy_graph(self):
        """(replay, ids, pos, tokens): a CUDA graph of step + argmax + bookkeeping. Each
        replay feeds token ``ids`` at position ``pos``, then moves both one ahead and
        writes the new token into ``tokens[:, pos]``."""
        if self.graph_step is None:
            ids = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
            pos = torch.zeros(1, dtype=torch.long, device=self.device)
            tokens = torch.zeros(self.batch, self.length + 1, dtype=torch.long, device=self.device)

            def body():
                nxt = self.step(ids, pos).argmax(-1, keepdim=True)
                pos.add_(1)
                ids.copy_(nxt)
                tokens.index_copy_(1, pos, nxt)

            replay, _ = self._capture(body)
            self.graph_step = (replay, ids, pos, tokens)
        return self.graph_step

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt's step from position 0: on CUDA a graph captured per prompt length
        (the last _MAX_PREFILL_GRAPHS lengths are kept), elsewhere the plan."""
        prompt = ids.shape[1]
        positions = torch.arange(prompt, device=self.device)
        if self.device.type != "cuda":
            return self.step(ids, positions)
        if prompt not in self.prefills:
            if len(self.prefills) >= _MAX_PREFILL_GRAPHS:
                del self.prefills[next(iter(self.prefills))]
            static = ids.clone()
            replay, logits = self._capture(lambda: self.step(static, positions))
            # the graph reads its inputs where they lay at capture: keep them alive
            self.prefills[prompt] = (replay, static, positions, logits)
        replay, static, _, logits = self.prefills[prompt]
        static.copy_(ids)
        replay()
        return logits.clone()  # the next replay overwrites it


class CompiledDecoder:
    """A causal LM compiled for autoregressive decoding; see :func:`compile_decoder`."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_seq_len: int,
                 backend: str, precision: str, opt_level: int):
        config = getattr(model, "config", None)
        if config is None or not callable(getattr(model, "forward", None)):
            raise DecoderError(f"compile_decoder needs a transformers causal LM (a model with a "
                               f"config, e.g. GPT2LMHeadModel), got {type(model).__name__}")
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        _cache_shape(self.config, 1, 1)  # validates the config
        limit = getattr(self.config, "max_position_embeddings", None)
        if max_batch_size < 1 or max_seq_len < 2:
            raise DecoderError(f"max_batch_size must be >= 1 and max_seq_len >= 2, got "
                               f"{max_batch_size} and {max_seq_len}")
        if limit and max_seq_len > limit:
            raise DecoderError(f"max_seq_len={max_seq_len} exceeds the model's "
                               f"max_position_embeddings={limit}; pass max_seq_len<={limit}")
        self.model = model.eval()
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.backend, self.precision, self.opt_level = backend, precision, opt_level
        self.buckets: dict[tuple[int, int], _Bucket] = {}

    def bucket(self, batch: int, needed: int) -> _Bucket:
        length = min(self.max_seq_len, max(_MIN_CACHE, 1 << (needed - 1).bit_length()))
        key = (batch, length)
        if key not in self.buckets:
            self.buckets[key] = _Bucket(self, batch, length)
        return self.buckets[key]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt plus ``max_new_tokens`` generated tokens, shape (batch, prompt + new).

        Greedy (``do_sample=False``) gives the tokens ``model.generate`` gives. With
        ``eos_token_id``, a sequence's tokens after its end-of-sequence become
        ``pad_token_id`` (default: the eos id), as in transformers; all sequences
        still run ``max_new_tokens`` steps.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
                input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError("generate(input_ids): a (batch, prompt length) integer tensor of "
                             f"token ids, got {getattr(input_ids, 'shape', type(input_ids))}")
        batch, prompt = input_ids.shape
        if not 1 <= batch <= self.max_batch_size:
            raise InputError(f"batch {batch} is outside 1..max_batch_size={self.max_batch_size}; "
                             "compile the decoder with a larger max_batch_size")
        if max_new_tokens < 1 or prompt < 1:
            raise InputError("generate needs a non-empty prompt and max_new_tokens >= 1")
        if prompt + max_new_tokens > self.max_seq_len:
            raise InputError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.max_seq_len}")
        if do_sample and (temperature <= 0 or (top_k is not None and top_k < 1)):
            raise InputError("sampling needs temperature > 0 and top_k >= 1 (or None)")
        b = self.bucket(batch, prompt + max_new_tokens)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            if not do_sample:
                return logits.argmax(-1, keepdim=True)
            logits = logits.float() / temperature
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            return torch.multinomial(logits.softmax(-1), 1, generator=generator)

        with b.exe.running():
            ids = input_ids.to(b.device, torch.long)
            nxt = pick(b.prefill(ids))
            if b.device.type == "cuda" and not do_sample and max_new_tokens > 1:
                replay, g_ids, g_pos, tokens = b.greedy_graph()
                g_ids.copy_(nxt)
                g_pos.fill_(prompt)
                tokens[:, prompt:prompt + 1] = nxt
                for _ in range(max_new_tokens - 1):
                    replay()
                new = tokens[:, prompt:prompt + max_new_tokens].clone()
            else:
                out = [nxt]
                for t in range(prompt, prompt + max_new_tokens - 1):
                    nxt = pick(b.step(nxt, torch.tensor([t], device=b.device)))
                    out.append(nxt)
                new = torch.cat(out, 1)
        if eos_token_id is not None:
            done = (new == eos_token_id).long().cumsum(1)
            after = (done - (new == eos_token_id).long()) > 0  # strictly after the first eos
            new = new.masked_fill(after, eos_token_id if pad_token_id is None else pad_token_id)
        return torch.cat([input_ids.to(new.device, torch.long), new], 1)

    def __repr__(self) -> str:
        return (f"CompiledDecoder({type(self.model).__name__}, backend={self.backend!r}, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"buckets={sorted(self.buckets)})")


def compile_decoder(model: torch.nn.Module, max_batch_size: int = 1, max_seq_len: int = 1024,
                    backend: str = "auto", precision: str = "fp32",
                    opt_level: int = 2) -> CompiledDecoder:
    """Compile a transformers causal LM for ``generate`` with a device-resident KV cache.

    The cache has the model's dtype (give a bf16 model for a bf16 cache).
    Steps are compiled lazily, per batch size and cache-length bucket.

    Example::

        lm = ds.compile_decoder(model, max_batch_size=64, max_seq_len=2048, backend="cuda")
        tokens = lm.generate(input_ids, max_new_tokens=64, do_sample=False)
    """
    return CompiledDecoder(model, max_batch_size, max_seq_len, backend, precision, opt_level)
