"""Our models over the paged cache vs Hugging Face transformers on the same weights.

Every position's logits must match HF's for the same sequence run alone: for a batch of prompts
packed into one forward pass, and for decoding step by step through the cache, including a step
that mixes one sequence's prefill chunk with another's decode token.
"""

from __future__ import annotations

import pytest
import torch
from minivllm.kernels import available_backends

from minivllm.layers.attention import PagedAttention
from tests.models.model_harness import PagedRunner, assert_logits_close, hf_logits
from tests.models.variants import VARIANTS


def random_tokens(count: int, vocab_size: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count,), generator=generator).tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_prefill_matches_hf(variant, our_model, hf_model):
    model, hf = our_model(variant), hf_model(variant)
    vocab = model.config.vocab_size
    # Lengths below, at and across block boundaries (block_size 8).
    prompts = {"a": random_tokens(5, vocab, 1), "b": random_tokens(16, vocab, 2),
               "c": random_tokens(29, vocab, 3)}
    runner = PagedRunner(model, num_blocks=32, block_size=8, seed=7)
    logits = runner.step(list(prompts.items()))
    # The pool is shuffled: blocks are not handed out in order.
    assert any(table != sorted(table) for table in runner.block_tables.values())
    for (seq, tokens), ours in zip(prompts.items(), logits):
        assert_logits_close(ours, hf_logits(hf, tokens), f"{variant} prompt {seq}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chunked_prefill_and_decode_match_hf(variant, our_model, hf_model):
    model, hf = our_model(variant), hf_model(variant)
    vocab = model.config.vocab_size
    a = random_tokens(13 + 6, vocab, 11)  # 13-token prompt, then 6 decode steps
    b = random_tokens(20 + 5, vocab, 12)  # 20-token prompt in two chunks, then 4 decode steps
    runner = PagedRunner(model, num_blocks=32, block_size=8, seed=3)
    got = {"a": [], "b": []}

    def step(chunks):
        for (seq, _), logits in zip(chunks, runner.step(chunks)):
            got[seq].append(logits)

    step([("a", a[:13]), ("b", b[:7])])  # whole prompt + first chunk of another
    step([("a", a[13:14]), ("b", b[7:20])])  # decode + the rest of a chunked prefill
    for i in range(4):  # decode both
        step([("b", b[20 + i:21 + i]), ("a", a[14 + i:15 + i])])
    step([("a", a[18:19])])  # one sequence alone

    assert_logits_close(torch.cat(got["a"]), hf_logits(hf, a), f"{variant} sequence a")
    assert_logits_close(torch.cat(got["b"]), hf_logits(hf, b[:24]), f"{variant} sequence b")


@pytest.mark.skipif("triton" not in available_backends("cpu"),
                    reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", ["qwen3", "opt"])
def test_triton_backend_matches_hf(variant, our_model, hf_model):
    """The same model through the Triton kernels (interpreted on CPU). The k/v handed to the cache
    write are strided views into the fused q|k|v output, which the reference does not care about."""
    model, hf = our_model(variant), hf_model(variant)
    a, b = random_tokens(20, model.config.vocab_size, 21), random_tokens(9, model.config.vocab_size, 22)
    runner = PagedRunner(model, num_blocks=16, block_size=8, seed=5)
    first = runner.step([("a", a[:15]), ("b", b[:8])], backend="triton")
    second = runner.step([("a", a[15:16]), ("b", b[8:9])], backend="triton")
    assert_logits_close(torch.cat([first[0], second[0]]), hf_logits(hf, a[:16]), f"{variant} a")
    assert_logits_close(torch.cat([first[1], second[1]]), hf_logits(hf, b), f"{variant} b")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_geometry_matches_config(variant, our_model, hf_model):
    """The numbers the engine sizes the KV cache with agree with HF's own attention modules."""
    model, hf = our_model(variant), hf_model(variant)
    hf_attention = [m for name, m in hf.named_modules() if name.endswith("self_attn")]
    assert model.num_layers == len(hf_attention) == model.config.num_hidden_layers
    k_proj = hf_attention[0].k_proj
    hf_head_dim = hf_attention[0].head_dim
    assert model.head_dim == hf_head_dim
    assert model.num_kv_heads * model.head_dim == k_proj.out_features
    layers = model.attention_layers()
    assert len(layers) == model.num_layers
    assert all(isinstance(layer, PagedAttention) for layer in layers)
    assert len({id(layer) for layer in layers}) == len(layers)
    assert all((l.num_kv_heads, l.head_dim) == (model.num_kv_heads, model.head_dim) for l in layers)
    assert not model.training
    hidden = model.config.hidden_size
    assert model.compute_logits(torch.zeros(3, hidden)).shape == (3, model.config.vocab_size)


def test_bfloat16_error_is_no_worse_than_hf_bfloat16(model_dir, hf_model):
    """bf16 rounds coarsely (~3 significant digits) and errors grow through the layers, so bf16
    logits cannot match float32 tightly. The yardstick is transformers' own bf16 run of the same
    weights: our distance to the float32 logits must be of the same size as its distance."""
    from transformers import AutoModelForCausalLM

    from minivllm.models import load_model

    directory = model_dir("qwen3")
    model = load_model(directory, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tokens = random_tokens(24, model.config.vocab_size, 5)
    ours = PagedRunner(model).step([("s", tokens)])[0]
    assert ours.dtype == torch.float32
    reference = hf_logits(hf_model("qwen3"), tokens)
    hf_bf16 = hf_logits(AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16), tokens)
    our_error = (ours - reference).abs().max().item()
    hf_error = (hf_bf16 - reference).abs().max().item()
    assert 0 < our_error <= 2 * hf_error


def test_forward_rejects_unpacked_inputs(our_model):
    model = our_model("llama")
    meta = None  # never reached: the shapes are checked first
    with pytest.raises(ValueError, match="1-D"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), meta)
    with pytest.raises(ValueError, match="positions has 3"):
        model(torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long), meta)
