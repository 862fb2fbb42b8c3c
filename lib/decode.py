"""
Decoding without per-token overhead: model.generate_tokens' tokens, with a KV cache whose position lives on the
device and one compiled step per token.

    decoder = Decoder(model, compile=True)   # once; keep it for every call, so the step compiles once
    for t in decoder.generate_tokens(idx, max_new_tokens, temperature=0.8, top_k=200, generators=...):
        ...                                  # each t is a (B, 1) tensor of new tokens, as from generate_tokens

Eager, a small model's decoding step is mostly Python and op dispatch (~40 small ops per layer, each a few
microseconds), not arithmetic. Compiled, the model's step and the choice of the next token (vocab limit, temperature,
top-k, softmax, or argmax) are one graph: a handful of fused kernels and the matmuls; on a GPU, CUDA graphs replay it
(torch.compile's reduce-overhead mode), so the CPU launches one graph per token. For that the step must see the same
shapes and no changing Python number every time (each would compile anew): StaticKVCache keeps the position as a
tensor on the device, writes new keys and values at it, and attention reads the whole buffer with a mask of the
positions written so far. The prompt runs through the same cache uncompiled, once; draws from per-row generators stay
outside the graph. The tokens are generate_tokens' for the same seed: the same model code and the same sampling, only
compiled. In float32 that holds token for token (tested); under bfloat16 autocast the compiled kernels round otherwise
(fused ops keep float32 intermediates), so a long greedy sample can part from the uncompiled one.
"""

import copy
import itertools

import torch
from torch import nn

from lib.runtime import trust_cpu_vector_flags
from model import draw, next_token_distribution

ROOM_STEP = 256  # the cache's length is the tokens a call needs, rounded up to this (capped at block_size):
#                  calls of similar lengths reuse the same buffers and the same compiled step


class StaticKVCache:
    """model.KVCache's interface (where, update, advance) for a compiled step: buffers of fixed shape, allocated once,
    and the position a tensor on the device. Its addresses never change, so CUDA graphs can replay writes into it."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # tokens cached
        self.key_positions = torch.arange(max_len, device=device)
        for t in (*self.k, *self.v, self.pos):
            torch._dynamo.mark_static_address(t)  # written in place by the compiled step: no copies for CUDA graphs
        self.shape = (config.n_layer, *shape)  # as KVCache's

    def where(self, T):
        return self.pos + self.key_positions[:T]  # (T,) positions of the new tokens

    def update(self, layer, k, v):
        positions = self.where(k.size(2))
        self.k[layer].index_copy_(2, positions, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, positions, v.to(self.v[layer].dtype))
        # every key slot, and which each query sees: the ones up to its own position
        return self.k[layer], self.v[layer], self.key_positions <= positions[:, None]  # (T, max_len)

    def advance(self, T):
        self.pos += T


def with_lowered_matmuls(model, dtype):
    """
    A copy of model whose Linear weights and biases are already in dtype; every other tensor is model's own, shared.
    Under autocast it computes the same numbers, bit for bit (autocast casts a Linear's weight and bias to dtype for
    its matmul), without the casts: eager autocast keeps cast weights for as long as its context lasts, but a compiled
    step would cast every weight again for every token.
    """
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    lowered = copy.deepcopy(model, shared)  # new modules around the same tensors
    for module in lowered.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return lowered


def step(model, kv_cache, idx, temperature, top_k, vocab_limit):
    """Run idx (B, T) after the tokens in the cache; what the next token is drawn from (next_token_distribution)."""
    logits, _ = model(idx, kv_cache=kv_cache)
    return next_token_distribution(logits[:, -1, :], temperature, top_k, vocab_limit)


class Decoder:
    """
    model.generate_tokens with a StaticKVCache, and with compile=True the one-token step compiled once. Under autocast
    it decodes with a copy of the model's matmul weights in autocast's dtype (with_lowered_matmuls), made on first use:
    make a new Decoder once the model's weights change.
    """

    def __init__(self, model, compile=True):
        self.model, self.cache, self.compiled, self.lowered = model, None, compile, {}
        self.cudagraphs = compile and next(model.parameters()).device.type == "cuda"
        self.step = step
        if compile and not self.cudagraphs:
            trust_cpu_vector_flags()
        if compile:
            self.step = torch.compile(step, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if self.cudagraphs else None)

    def model_and_cache(self, batch_size, max_len, device):
        """The model to run (under autocast, with_lowered_matmuls') and the cache for this call: the last one when it
        fits (the same buffers, so the compiled step runs as it is)."""
        device_type = torch.device(device).type
        model, dtype = self.model, next(self.model.parameters()).dtype
        if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) != dtype:
            dtype = torch.get_autocast_dtype(device_type)
            if dtype not in self.lowered:
                self.lowered[dtype] = with_lowered_matmuls(self.model, dtype)
            model = self.lowered[dtype]
        c = self.cache
        if c is None or c.shape[1] != batch_size or c.shape[3] != max_len or c.k[0].dtype != dtype:
            self.cache = c = StaticKVCache(self.model.config, batch_size, max_len, device, dtype)
        c.pos.zero_()
        return model, c

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, stop_token=None,
                        generators=None):
        """model.generate_tokens' arguments and tokens: yields each new (B, 1) token as soon as it is drawn."""
        B, T = idx.shape
        block_size = self.model.config.block_size
        fed = T + max_new_tokens - 1  # tokens that go through the cache (the last one drawn never does)
        max_len = min(block_size, -(-fed // ROOM_STEP) * ROOM_STEP)
        model, cache = self.model_and_cache(B, max_len, idx.device)
        length = T
        if T > block_size:
            cache = None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        options = (temperature, top_k, vocab_limit)
        context = idx[:, -block_size:].contiguous()  # the last block_size tokens, for the cropped context
        for i in range(max_new_tokens):
            if i == 0 and cache is not None:  # the prompt, through the cache: compiled only when it is one token
                distribution = (self.step if T == 1 else step)(model, cache, idx, *options)
            elif cache is not None and length < max_len:  # one token after the cached ones
                distribution = self.step(model, cache, idx_next, *options)
                length += 1
            else:  # past block_size the positions shift, so the cropped context is run in full: (B, block_size)
                distribution = self.step(model, None, context, *options)
            idx_next = draw(distribution, generators)
            if self.cudagraphs:  # the graph's output is overwritten by its next replay
                idx_next = idx_next.clone()
            context = torch.cat((context[:, 1 - block_size:], idx_next), dim=1)  # (contiguous: a graph's input)
            yield idx_next
            if stop_token is not None:
                done |= idx_next.squeeze(1) == stop_token
                if done.all():
                    break
