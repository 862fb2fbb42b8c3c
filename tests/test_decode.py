"""
Decoding: a KV cache continued by several tokens at a time (a chat's next turn), generate_tokens continuing a cache,
and lib/decode.Decoder (static cache, compiled step) giving model.generate_tokens' tokens.
"""

import pytest
import torch

from lib.decode import Decoder, StaticKVCache, with_lowered_matmuls
from lib.runtime import can_compile
from model import GPT, GPTConfig, KVCache

RECIPES = {"gpt2": {}, "modern": dict(rotary=True, rmsnorm=True, qk_norm=True, relu2=True, tie_head=False,
                                      logit_softcap=15.0, x0_mix=True)}


def tiny(recipe="gpt2", block_size=16, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=recipe == "gpt2",
                          **RECIPES[recipe]))
    for p in model.parameters():  # (zero_init-style zeros and x0_mix's (1, 0) would hide bugs)
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def all_logits(model, idx):
    logits, _ = model(idx, torch.zeros_like(idx))  # with targets: every position's
    return logits


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_cache_continued_by_several_tokens_matches_full_forward(recipe):
    model = tiny(recipe)
    idx = torch.randint(65, (2, 14), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.config, 2)
    with torch.no_grad():
        first = model(idx[:, :5], kv_cache=cache)[0]  # a prompt
        turn = model(idx[:, 5:9], kv_cache=cache)[0]  # then 4 tokens at once: query i sees keys up to 5 + i
        one = model(idx[:, 9:10], kv_cache=cache)[0]
        full = all_logits(model, idx[:, :10])
    assert cache.length == 10
    torch.testing.assert_close(first[:, -1], full[:, 4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(turn[:, -1], full[:, 8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[:, -1], full[:, 9], atol=1e-5, rtol=1e-5)


def test_generate_tokens_continues_a_cache():
    """A chat's second turn: generate_tokens with the cache of the first feeds only the new tokens and yields what
    generating from the whole conversation yields."""
    model = tiny("modern", block_size=32)
    turn1, turn2 = torch.randint(65, (1, 4)), torch.randint(65, (1, 3))
    cache = KVCache(model.config, 1)
    reply1 = torch.cat(list(model.generate_tokens(turn1, 6, temperature=0, kv_cache=cache)), dim=1)
    assert cache.length == 4 + 5  # the prompt and all but the last token drawn
    # the next turn: the last reply token, then the user's tokens
    reply2 = torch.cat(list(model.generate_tokens(torch.cat((reply1[:, -1:], turn2), 1), 6, temperature=0,
                                                  kv_cache=cache)), dim=1)
    whole = model.generate(torch.cat((turn1, reply1, turn2), 1), 6, temperature=0)
    assert torch.equal(reply2, whole[:, -6:])


def generated(generate, prompt, n, seed=None, **kwargs):
    gens = None if seed is None else [torch.Generator().manual_seed(seed + i) for i in range(prompt.size(0))]
    return torch.cat(list(generate(prompt, n, generators=gens, **kwargs)), dim=1)


CASES = [dict(temperature=0), dict(temperature=1.0, top_k=5, seed=3), dict(temperature=0.8, vocab_limit=40, seed=4)]


@pytest.mark.parametrize("recipe", ["gpt2", "modern"])
def test_static_cache_decoder_yields_generate_tokens_tokens(recipe):
    """Uncompiled: the static cache (positions as a tensor, the whole buffer read with a mask) is the plain cache."""
    model = tiny(recipe)
    decoder = Decoder(model, compile=False)
    prompt = torch.randint(65, (3, 4), generator=torch.Generator().manual_seed(2))
    for kwargs in CASES:  # 30 steps: through the cache, then past block_size=16 with cropped windows
        assert torch.equal(generated(decoder.generate_tokens, prompt, 30, **kwargs),
                           generated(model.generate_tokens, prompt, 30, **kwargs)), kwargs
    long_prompt = torch.randint(65, (2, 20))  # longer than block_size: cropped from the start
    assert torch.equal(generated(decoder.generate_tokens, long_prompt, 5, temperature=0),
                       generated(model.generate_tokens, long_prompt, 5, temperature=0))
    stop = generated(model.generate_tokens, prompt[:1], 10, temperature=0)[0, 4].item()
    assert torch.equal(generated(decoder.generate_tokens, prompt[:1], 10, temperature=0, stop_token=stop),
                       generated(model.generate_tokens, prompt[:1], 10, temperature=0, stop_token=stop))


def test_static_cache_is_reused_across_calls():
    model = tiny()
    decoder = Decoder(model, compile=False)
    a = generated(decoder.generate_tokens, torch.randint(65, (2, 3)), 5, temperature=0)
    cache = decoder.cache
    b = generated(decoder.generate_tokens, torch.randint(65, (2, 5)), 4, temperature=0)
    assert decoder.cache is cache and cache.k[0].shape == (2, 2, 16, 16) and a.shape == (2, 5) and b.shape == (2, 4)


def test_lowered_matmuls_give_autocasts_numbers_without_copying_the_rest():
    model = tiny("modern")
    lowered = with_lowered_matmuls(model, torch.bfloat16)
    assert lowered.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32  # the model itself is untouched
    assert lowered.transformer.wte.weight is model.transformer.wte.weight  # shared, not copied
    idx = torch.randint(65, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(all_logits(lowered, idx), all_logits(model, idx))


def test_static_cache_under_cpu_bfloat16_autocast_matches_the_plain_cache():
    """The CPU bfloat16 attention (kernels.attention) with the static cache's mask: the plain cache's logits."""
    model = tiny("modern")
    idx = torch.randint(65, (2, 9))
    plain = KVCache(model.config, 2)
    static = StaticKVCache(model.config, 2, 16, "cpu", torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for cache in (plain, static):
            cache.logits = [model(idx[:, :6], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0]
                                                                      for t in range(6, 9)]
    for a, b in zip(plain.logits, static.logits):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
    assert static.pos.item() == 9


@pytest.mark.slow
@pytest.mark.skipif(not can_compile("cpu"), reason="torch.compile needs a C++ compiler here")
def test_compiled_decoder_yields_generate_tokens_tokens():
    """Compiled (one graph for the one-token step, one for the cropped window past block_size): in float32 the
    same tokens, drawn from the same probabilities, with no compiling per token."""
    from torch._dynamo.utils import counters

    model = tiny("modern")
    decoder = Decoder(model, compile=True)
    prompt = torch.randint(65, (2, 3), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    counters.clear()
    try:
        kwargs = dict(temperature=1.0, top_k=5, seed=3)
        assert torch.equal(generated(decoder.generate_tokens, prompt, 24, **kwargs),
                           generated(model.generate_tokens, prompt, 24, **kwargs))
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()


def test_a_cpu_decodes_narrow_models_in_float32_under_auto():
    from lib.runtime import Runtime, autocast, for_decoding

    def runtime(device_type, dtype):
        return Runtime(0, 0, 1, device_type, device_type, dtype, autocast(device_type, dtype))

    narrow = for_decoding(runtime("cpu", "bfloat16"), "auto", n_embd=128)
    assert narrow.dtype == "float32" and not isinstance(narrow.autocast, torch.autocast)
    for rt, requested, n_embd in [(runtime("cpu", "bfloat16"), "bfloat16", 128),  # asked for: kept
                                  (runtime("cpu", "bfloat16"), "auto", 768),  # wide: bfloat16 pays at batch 16
                                  (runtime("cuda", "bfloat16"), "auto", 128)]:
        assert for_decoding(rt, requested, n_embd) is rt
