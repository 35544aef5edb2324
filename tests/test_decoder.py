"""ds.compile_decoder: KV-cache decoding gives transformers' tokens, cache updated in place."""

import pytest
import torch

import deepseek as ds
from deepseek.errors import InputError
from deepseek.runtime.decoder import DecoderError

transformers = pytest.importorskip("transformers")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gpt2(vocab=1000):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=vocab, n_positions=256,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def _llama(vocab=1000):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def _reference(model, ids, new):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("factory", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_greedy_tokens_equal_transformers_generate(factory, device):
    model = factory().to(device)
    lm = ds.compile_decoder(model, max_batch_size=4, max_seq_len=256,
                            backend="cpu" if device == "cpu" else "cuda")
    ids = torch.randint(2, 1000, (3, 7), device=device)
    out = lm.generate(ids, max_new_tokens=20)
    assert out.shape == (3, 27)
    assert torch.equal(out.cpu(), _reference(model, ids, 20).cpu())
    bucket = lm.buckets[(3, 64)]
    assert bucket.in_place  # the cache is written where it lies, never copied
    # a second prompt (other length, same bucket) reuses the compiled step and its cache
    ids2 = torch.randint(2, 1000, (3, 12), device=device)
    assert torch.equal(lm.generate(ids2, max_new_tokens=9).cpu(),
                       _reference(model, ids2, 9).cpu())
    assert list(lm.buckets) == [(3, 64)]
    # the first prompt's length again: on CUDA its prefill graph replays on new tokens
    ids3 = torch.randint(2, 1000, (3, 7), device=device)
    assert torch.equal(lm.generate(ids3, max_new_tokens=5).cpu(), _reference(model, ids3, 5).cpu())
    if device == "cuda":
        assert sorted(bucket.prefills) == [7, 12]


def test_step_logits_match_eager_forward():
    """Prefill and single-token steps give the full-sequence forward's logits."""
    model = _gpt2()
    lm = ds.compile_decoder(model, max_batch_size=2, max_seq_len=128, backend="cpu")
    ids = torch.randint(2, 1000, (2, 10))
    b = lm.bucket(2, 10)
    with b.exe.running():
        first = b.step(ids[:, :6], torch.arange(6))
        later = [b.step(ids[:, t:t + 1], torch.tensor([t])) for t in range(6, 10)]
    with torch.no_grad():
        full = model(ids).logits
    for got, want in zip([first] + later, [full[:, 5]] + [full[:, t] for t in range(6, 10)]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cache_bucket_grows_with_the_request():
    model = _gpt2()
    lm = ds.compile_decoder(model, max_batch_size=1, max_seq_len=256, backend="cpu")
    assert lm.bucket(1, 10).length == 64
    assert lm.bucket(1, 65).length == 128
    assert lm.bucket(1, 200).length == 256


def test_eos_pads_like_transformers():
    model = _gpt2()
    lm = ds.compile_decoder(model, max_batch_size=2, max_seq_len=128, backend="cpu")
    ids = torch.randint(2, 1000, (2, 5))
    greedy = lm.generate(ids, max_new_tokens=12)
    eos = int(greedy[0, 8])  # a token the first sequence generates: make it the end
    out = lm.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    assert torch.equal(out[:, :ref.shape[1]], ref)
    assert (out[:, ref.shape[1]:] == 0).all()  # transformers stopped; we pad to the end


def test_sampling_is_seeded_and_respects_top_k():
    model = _gpt2()
    lm = ds.compile_decoder(model, max_batch_size=2, max_seq_len=128, backend="cpu")
    ids = torch.randint(2, 1000, (2, 5))
    a = lm.generate(ids, 10, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(3))
    b = lm.generate(ids, 10, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, lm.generate(ids, 10))  # greedy differs from sampling here
    # top_k=1 sampling is greedy
    assert torch.equal(lm.generate(ids, 10, do_sample=True, top_k=1), lm.generate(ids, 10))


def test_bad_calls_give_clear_errors():
    model = _gpt2()
    with pytest.raises(DecoderError, match="max_position_embeddings"):
        ds.compile_decoder(model, max_seq_len=4096)
    with pytest.raises(DecoderError, match="causal LM"):
        ds.compile_decoder(torch.nn.Linear(2, 2))
    lm = ds.compile_decoder(model, max_batch_size=2, max_seq_len=64, backend="cpu")
    with pytest.raises(InputError, match="max_batch_size"):
        lm.generate(torch.randint(2, 100, (3, 4)), 4)
    with pytest.raises(InputError, match="max_seq_len"):
        lm.generate(torch.randint(2, 100, (1, 40)), 30)
    with pytest.raises(InputError, match="integer tensor"):
        lm.generate(torch.randn(1, 4), 4)


def test_cuda_plan_writes_each_layers_keys_and_values_in_one_kernel():
    """The step's CUDA code (generated here, run on GPUs by test_greedy_tokens_...[cuda])
    writes a layer's key and value caches with one KVWrite launch, in place."""
    from deepseek.backends.cpu.codegen import generate_plan
    from deepseek.ir.interpreter import bind_inputs

    pytest.importorskip("triton")
    lm = ds.compile_decoder(_gpt2(), max_batch_size=2, max_seq_len=128, backend="cpu")
    b = lm.bucket(2, 10)
    graph = b.engine._parts[0].graph
    inputs = [torch.zeros(2, 1, dtype=torch.long), torch.tensor([3]), *b.cache]
    source = generate_plan(graph, bind_inputs(graph, inputs), "cuda").source
    assert source.count("triton_kv") == 2  # two layers, one launch each
    assert "= i_kv_1\n" in source and "= i_kv_3\n" in source  # values: the caches themselves
    assert "index_put" not in source.replace("v_index_put", "")
