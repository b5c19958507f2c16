"""minivllm's paged attention as a transformers attention implementation (minivllm/integrations/hf.py).

The oracle is transformers' own `sdpa` on the same weights: greedy tokens must be equal, token for
token, in float32, and logits equal within float32 rounding. A spy on `minivllm.kernels.
paged_attention` shows that the kernel, not SDPA, computed every attention.
"""

from __future__ import annotations

import ast
import inspect
import os
import warnings
from pathlib import Path

import pytest
import torch

from minivllm import kernels
from minivllm.integrations import hf
from tests.devices import DEVICE, ON_GPU, on_device
from tests.integrations.conftest import ARCHS, left_pad

PROMPT = [17, 203, 95, 311, 48, 150, 77, 402, 9]
# Different lengths: `generate` pads them on the left; the shortest is a single token.
BATCH = [[23, 87, 301, 56, 199, 402, 11, 64, 350, 72, 18, 260, 95], [40, 41, 300, 8, 77],
         [120, 7, 88, 450, 31, 63, 210, 99, 5], [333]]
FALLBACK = "minivllm attention falls back to SDPA"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call into minivllm's kernel entry point, recorded, then run for real."""
    calls = []
    real = kernels.paged_attention

    def spy(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, **kwargs):
        calls.append(dict(k_cache=k_cache, seq_lens=seq_lens.tolist(), cu_seqlens_q=cu_seqlens_q.tolist(),
                          backend=kwargs["backend"]))
        return real(query, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, **kwargs)

    monkeypatch.setattr(kernels, "paged_attention", spy)
    return calls


@pytest.fixture
def fallback_warnings(monkeypatch):
    """The fallback warnings issued during the test (the once-per-reason memory starts empty)."""
    monkeypatch.setattr(hf, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught if str(w.message).startswith(FALLBACK)]


@torch.no_grad()
def greedy(model, impl: str, ids, mask, new_tokens: int, **kwargs) -> list[list[int]]:
    model.set_attn_implementation(impl)
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def logits(model, impl: str, ids, mask) -> torch.Tensor:
    model.set_attn_implementation(impl)
    return model(ids, attention_mask=mask).logits


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------
def test_register_twice_is_harmless_and_selects_the_kernel(tiny_dir):
    from transformers import AttentionInterface, AutoModelForCausalLM

    assert hf.register() == hf.register() == hf.NAME == "minivllm"
    assert hf.is_registered() and "sdpa" in AttentionInterface._global_mapping  # nothing replaced
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir("qwen3")), attn_implementation=hf.register())
    assert model.config._attn_implementation == "minivllm"


@pytest.mark.parametrize("name", ["", "sdpa", "eager", "my_flash_attn", "paged|minivllm", 3])
def test_register_rejects_names_transformers_treats_specially(name):
    with pytest.raises(ValueError, match="name"):
        hf.register(name)


def test_register_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        hf.register(backend="flash")


def test_imports_point_one_way():
    """The integration imports the kernels and transformers, never the engine (docs/design.md, "Layout")."""
    tree = ast.parse(Path(hf.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    ours = {name for name in imported if name.startswith("minivllm")}
    assert ours == {"minivllm.kernels"}
    assert {name.split(".")[0] for name in imported} <= {"minivllm", "torch", "transformers", "__future__",
                                                        "functools", "itertools", "warnings", "dataclasses"}


# --------------------------------------------------------------------------------------------
# The pieces: pages over HF's cache, the mask object
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["BHSD", "BSHD"])
def test_as_pages_views_the_cache_without_copying(memory):
    batch, heads, seq, dim = 3, 2, 7, 8
    if memory == "BHSD":  # what DynamicCache concatenates
        kv = torch.randn(batch, heads, seq, dim)
    else:  # what the projections produce: [B, S, H, D] memory seen as [B, H, S, D]
        kv = torch.randn(batch, seq, heads, dim).transpose(1, 2)
    pages, blocks_per_row = hf.as_pages(kv)
    assert pages.shape[1:] == (1, heads, dim)
    assert pages.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    for b in range(batch):
        for s in range(seq):
            torch.testing.assert_close(pages[b * blocks_per_row + s, 0], kv[b, :, s], rtol=0, atol=0)


def test_kv_whose_last_dim_is_strided_is_copied_once():
    kv = torch.randn(2, 2, 5, 16)[..., ::2]  # head_dim not contiguous: no view can page it
    assert hf.as_pages(kv) is None
    k_pages, v_pages, blocks_per_row = hf._paged_kv(kv, kv)
    assert k_pages.stride(-1) == 1
    torch.testing.assert_close(k_pages[1 * blocks_per_row + 3, 0], kv[1, :, 3], rtol=0, atol=0)


@pytest.mark.parametrize("q_length, kv_length", [(6, 6), (1, 9), (3, 9)])  # prefill, decode, chunk
def test_mask_object_is_transformers_sdpa_mask(q_length, kv_length):
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    starts = [0, 2, kv_length - 1]
    padding = torch.stack([torch.arange(kv_length) >= s for s in starts]).long()
    args = dict(batch_size=3, q_length=q_length, kv_length=kv_length, q_offset=kv_length - q_length,
                mask_function=causal_mask_function, attention_mask=padding)
    mask = hf.left_padded_causal_mask(**args)
    assert isinstance(mask, hf.LeftPaddedCausal) and mask.starts == starts
    assert torch.equal(mask.dense(), sdpa_mask(**args, allow_is_causal_skip=False))


def test_padding_among_the_queries_becomes_its_own_sequence():
    mask = hf.LeftPaddedCausal(starts=[0, 3, 5], q_length=6, kv_length=6, device=torch.device("cpu"))
    # (row, first key, context length, queries): the padding rows attend among themselves only.
    assert list(mask.segments()) == [(0, 0, 6, 6), (1, 0, 3, 3), (1, 3, 3, 3), (2, 0, 5, 5), (2, 5, 1, 1)]
    block_tables, seq_lens, cu_seqlens_q, max_seq_len = mask.plan(10, torch.device("cpu"))
    assert seq_lens.tolist() == [6, 3, 3, 5, 1] and cu_seqlens_q.tolist() == [0, 6, 9, 12, 17, 18]
    assert block_tables[2, :3].tolist() == [13, 14, 15] and block_tables[4, 0] == 25 and max_seq_len == 6


# --------------------------------------------------------------------------------------------
# generate: minivllm == sdpa, token for token
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_one_prompt_greedy_equals_sdpa(arch, tiny_model, kernel_calls, fallback_warnings):
    model, name = tiny_model(arch), hf.register()
    ids, mask = left_pad([PROMPT])
    expected = greedy(model, "sdpa", ids, mask, 12)
    assert greedy(model, name, ids, mask, 12) == expected
    # 12 forward passes (the prompt, then 11 decodes), every layer of each through the kernel,
    # which on a CPU resolves to the sdpa backend.
    assert len(kernel_calls) == 12 * model.config.num_hidden_layers
    assert {c["backend"] for c in kernel_calls} == {"auto"}
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert kernel_calls[-1]["seq_lens"] == [len(PROMPT) + 11] and fallback_warnings() == []


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_greedy_equals_sdpa(arch, tiny_model, kernel_calls, fallback_warnings):
    model, name = tiny_model(arch), hf.register()
    ids, mask = left_pad(BATCH)
    expected = greedy(model, "sdpa", ids, mask, 10)
    assert greedy(model, name, ids, mask, 10) == expected
    assert fallback_warnings() == [] and len(kernel_calls) == 10 * model.config.num_hidden_layers
    # The prompt pass: each padded row is its padding (attending to itself) then its prompt.
    assert kernel_calls[0]["seq_lens"] == [13, 8, 5, 4, 9, 12, 1]
    # The last decode: one query per row, its context from its first real token.
    assert kernel_calls[-1]["seq_lens"] == [len(p) + 9 for p in BATCH]
    assert kernel_calls[-1]["cu_seqlens_q"] == list(range(len(BATCH) + 1))


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_logits_match_sdpa(arch, tiny_model):
    model, name = tiny_model(arch), hf.register()
    ids, mask = left_pad(BATCH)
    real = mask.bool()
    expected = logits(model, "sdpa", ids, mask)
    torch.testing.assert_close(logits(model, name, ids, mask)[real], expected[real], rtol=1e-5, atol=1e-5)
    # The padding matters here: attending to it moves the logits far beyond that tolerance.
    assert (logits(model, "sdpa", ids, torch.ones_like(mask))[real] - expected[real]).abs().max() > 1e-2


def test_kernel_reads_the_cache_in_place(tiny_model, kernel_calls):
    """The K/V the kernel reads are HF's DynamicCache tensors themselves, seen as pages."""
    from transformers import DynamicCache

    model, name = tiny_model("qwen3"), hf.register()
    model.set_attn_implementation(name)
    ids, mask = left_pad(BATCH)
    cache = DynamicCache(config=model.config)
    # transformers renamed `past_key_values` to `cache` after 5.17
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_kwarg: cache})
        model(torch.tensor([[5]] * len(BATCH)), attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
              **{cache_kwarg: cache})
    layers = model.config.num_hidden_layers
    for layer, call in enumerate(kernel_calls[layers:]):  # the decode step, once the cache exists
        keys = cache.layers[layer].keys
        assert call["k_cache"].untyped_storage().data_ptr() == keys.untyped_storage().data_ptr()
        assert call["k_cache"].shape[1] == 1  # one-token blocks


@pytest.mark.skipif(not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton kernel needs a GPU or the Triton interpreter")
@on_device
def test_triton_kernel_on_the_strided_view(tiny_dir, fallback_warnings):
    """The GPU path: the Triton kernel reads the strided page view (here in the interpreter on CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir("qwen3")), dtype=torch.float32).to(DEVICE).eval()
    name = hf.register("minivllm-triton", backend="triton")
    ids, mask = (t.to(DEVICE) for t in left_pad(BATCH[:2]))
    assert greedy(model, name, ids, mask, 3) == greedy(model, "sdpa", ids, mask, 3)
    assert fallback_warnings() == []


# --------------------------------------------------------------------------------------------
# What the kernel cannot express falls back to SDPA, once-warned and still right
# --------------------------------------------------------------------------------------------
def test_sliding_window_layer_falls_back_with_one_warning(tiny_model, kernel_calls, fallback_warnings):
    # Qwen2 with its second layer on a 4-token sliding window.
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    name = hf.register()
    ids, mask = left_pad(BATCH)
    expected = greedy(model, "sdpa", ids, mask, 8)
    assert greedy(model, name, ids, mask, 8) == expected
    (warning,) = fallback_warnings()
    assert "sliding-window" in warning and "window 4" in warning
    assert len(kernel_calls) == 8  # the full-attention layer, every forward pass


def test_right_padding_falls_back(tiny_model, fallback_warnings):
    model, name = tiny_model("llama"), hf.register()
    ids, mask = left_pad(BATCH)
    ids, mask = ids.flip(1), mask.flip(1)  # the same prompts padded on the right (and reversed)
    real = mask.bool()
    torch.testing.assert_close(logits(model, name, ids, mask)[real], logits(model, "sdpa", ids, mask)[real])
    (warning,) = fallback_warnings()
    assert "not left padding" in warning


def test_static_cache_falls_back(tiny_model, kernel_calls, fallback_warnings):
    model, name = tiny_model("qwen3"), hf.register()
    ids, mask = left_pad(BATCH[:2])
    expected = greedy(model, "sdpa", ids, mask, 5, cache_implementation="static")
    assert greedy(model, name, ids, mask, 5, cache_implementation="static") == expected
    (warning,) = fallback_warnings()
    assert "static cache" in warning and kernel_calls == []


# --------------------------------------------------------------------------------------------
# Continuous batching (generate_batch): runs where transformers allows it (docs/hf_backend.md)
# --------------------------------------------------------------------------------------------
def _generate_batch(model, prompts, new_tokens):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    # A small explicit pool: the automatic sizing reads free memory (psutil on a CPU).
    config = ContinuousBatchingConfig(block_size=16, num_blocks=32, max_batch_tokens=16)
    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=config)
    return [out[rid].generated_tokens for rid in sorted(out, key=lambda rid: int(rid.rsplit("_", 1)[1]))]


@pytest.mark.skipif(not hf.supports_continuous_batching(),
                    reason="this transformers accepts no registered name in continuous batching")
@on_device
def test_generate_batch_through_the_kernel(tiny_dir, kernel_calls):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir("qwen3")), dtype=torch.float32,
                                                 attn_implementation=hf.register()).to(DEVICE).eval()
    # The batching name, set explicitly: transformers would otherwise prefer an installed flash.
    assert hf.continuous_batching_name() == "paged|minivllm"
    model.set_attn_implementation(hf.continuous_batching_name())
    # max_batch_tokens 16 < 20: the longest prompt is prefilled in chunks over cached tokens.
    prompts = [*BATCH, list(range(30, 50))]
    got = _generate_batch(model, prompts, 6)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        expected = [model.generate(torch.tensor([p], device=DEVICE), do_sample=False, max_new_tokens=6,
                                   min_new_tokens=6, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert got == expected
    # The kernel read transformers' paged cache itself: [slots, 1, Hkv, D], slots = (blocks + 2) x 16.
    assert kernel_calls and {tuple(c["k_cache"].shape[:2]) for c in kernel_calls} == {(34 * 16, 1)}


@pytest.mark.skipif(hf.supports_continuous_batching(), reason="this transformers runs it (test above)")
def test_generate_batch_refuses_a_registered_name(tiny_dir):
    """transformers 5.24 accepts only sdpa, paged|eager and flash names in continuous batching."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir("qwen3")), attn_implementation=hf.register())
    with pytest.raises(ValueError, match="minivllm is not supported for continuous batching"):
        _generate_batch(model, BATCH, 2)
