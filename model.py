"""
The GPT language model, in one file, read top to bottom. Two of its ops have fast versions in lib/kernels.py
(RMSNorm with its backward written out, attention under CPU bfloat16 autocast); everything else is here.

Parameter names follow OpenAI's GPT-2 (wte, wpe, c_attn, c_proj, ln_f) so that
checkpoints convert key by key. References:
1) OpenAI's GPT-2 TensorFlow implementation: https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face transformers' PyTorch implementation of GPT-2 (GPT2LMHeadModel)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from lib.kernels import attention, rms_norm  # fast forms of two ops (see the docstring)


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model sees (learned position table size)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    # the modern recipe (train.py's recipe='modern' turns them all on); every one off is GPT-2, bit for bit
    rotary: bool = False  # rotary position embeddings on queries and keys instead of the learned wpe table
    rmsnorm: bool = False  # parameter-free RMSNorm instead of LayerNorm
    qk_norm: bool = False  # RMS-normalize each head's queries and keys before attention
    relu2: bool = False  # ReLU(x)^2 in the MLP instead of GELU
    zero_init: bool = False  # output projections into the residual stream (c_proj) start at zero
    tie_head: bool = True  # lm_head shares its weight with wte (GPT-2); False: a separate output matrix
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), bounded in (-cap, cap)
    x0_mix: bool = False  # embedding shortcut: each block first takes x = a_i * x + b_i * x0 (learned a_i, b_i)


# GPT-2 checkpoints store these as Conv1D weights, (in, out): transposed relative to nn.Linear's (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1, and we keep the GPT-2 names)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm (no gain, no bias)."""

    def forward(self, x):
        return rms_norm(x)


def norm(config):
    return RMSNorm() if config.rmsnorm else LayerNorm(config.n_embd, bias=config.bias)


def rotary(pos, head_size):
    """cos and sin tables (T, hs) of rotary embeddings at positions pos (RoFormer, base 10000): pair i's angle at
    columns i and i + hs/2, the sine negated in the first half (apply_rotary's layout)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size))
    angles = pos.float()[:, None] * inv_freq[None, :]  # (T, hs/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x, cos, sin):
    """Rotate the pairs (x1, x2) = (x[..., i], x[..., i + hs/2]) of x (..., T, hs) by each position's angles:
    (x1 cos - x2 sin, x2 cos + x1 sin), written as x * cos + (x2, x1) * sin with rotary()'s tables."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((x2, x1), dim=-1) * sin).type_as(x)


class KVCache:
    """
    Keys and values of every layer for the tokens seen so far, so that every token goes through the model once: a
    prompt, then one new token per step, or a chat's next turn after the tokens already in it. Allocated once, on
    first use, for max_len tokens (block_size unless given), in the values' dtype (autocast may lower it; RMS-normed
    keys come float32 and are stored in it too, so attention never converts the whole cache). The model asks it
    where(T) the T new tokens sit, update() per layer, then advance(T); lib/decode.StaticKVCache answers the same
    with its position on the device, for one compiled decoding step.
    """

    def __init__(self, config, batch_size, max_len=None):
        max_len = max_len or config.block_size
        assert max_len <= config.block_size, f"max_len {max_len} > block_size {config.block_size}"
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = self.v = None
        self.length = 0  # tokens already cached

    def where(self, T):
        """The positions of the next T tokens, as an index into the position tables."""
        assert self.length + T <= self.shape[3], f"{self.length + T} tokens > the cache's {self.shape[3]}"
        return slice(self.length, self.length + T)

    def update(self, layer, k, v):
        """Store this step's (B, nh, T, hs) keys/values of `layer`. Returns all keys and values so far and which of
        them each new query sees: a (T, T_total) mask, or None when that is all of them (T == 1) or the causal
        pattern (an empty cache)."""
        if self.k is None:
            self.k, self.v = v.new_zeros(self.shape), v.new_zeros(self.shape)
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        mask = None
        if 0 < start and k.size(2) > 1:  # several tokens after cached ones: query i sees keys 0 .. start + i
            mask = torch.ones(k.size(2), end, dtype=torch.bool, device=k.device).tril(start)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def advance(self, T):
        self.length += T


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.layer = layer  # index into the KV cache

    def forward(self, x, kv_cache=None, rope=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm or rope is not None:  # queries and keys go through the same ops: one call for both
            qk = torch.stack((q, k))  # (2, B, nh, T, hs)
            if self.qk_norm:  # every head's query and key vectors get norm sqrt(hs)
                qk = rms_norm(qk)
            if rope is not None:  # rotary: q.k then depends only on the positions' difference
                qk = apply_rotary(qk, *rope)
            q, k = qk
        mask = None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(self.layer, k, v)  # (B, nh, T_total, hs), (T, T_total) or None
        # without a mask: causal when the queries are the whole sequence, else (one new token) everything
        y = attention(q, k, v, self.dropout if self.training else 0.0, is_causal=mask is None and T > 1, mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's tanh approximation, for exact checkpoint parity
        self.relu2 = config.relu2
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)
        if config.x0_mix:  # (a_i, b_i) of x = a_i * x + b_i * x0; starts as the plain residual stream
            self.x0_mix = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, x0=None, kv_cache=None, rope=None):
        if x0 is not None:
            a, b = self.x0_mix.unbind()
            x = a * x + b * x0
        x = x + self.attn(self.ln_1(x), kv_cache, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            **({} if config.rotary else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),  # positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.rotary:  # the tables once, not per forward (compiled, each layer's kernel would recompute cos/sin)
            cos, sin = rotary(torch.arange(config.block_size), config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs): not in checkpoints
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.tie_head:  # weight tying: the output projection is the token embedding
            # (https://paperswithcode.com/method/weight-tying)
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
                if config.zero_init:  # each block starts as the identity
                    torch.nn.init.zeros_(p)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """
        Parameter count. non_embedding leaves out the lookup tables (wpe, and wte when the head is untied; a tied
        wte is the head's matmul and stays): what remains are the weights every token multiplies by (+ gains).
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
            n_params -= self.transformer.wte.weight.numel() if not self.config.tie_head else 0
        return n_params

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        pos = kv_cache.where(T) if kv_cache is not None else slice(0, T)  # the tokens' positions: a slice or (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.config.rotary else None
        if rope is None:
            x = x + self.transformer.wpe.weight[pos]  # position embeddings (T, C)
        x = self.transformer.drop(x)
        x0 = x if self.config.x0_mix else None  # the first block's input, mixed into every block's
        for block in self.transformer.h:
            x = block(x, x0, kv_cache, rope)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is not None:
            logits = self.softcap(self.lm_head(x))  # (B, T, vocab_size)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.softcap(self.lm_head(x[:, [-1], :]))  # inference needs only the last position: (B, 1, V)
            loss = None
        return logits, loss

    def softcap(self, logits):
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def crop_block_size(self, block_size):
        """Shrink the context length (e.g. load GPT-2 at 1024, train at 256) by cutting the position table."""
        assert block_size <= self.config.block_size, f"can only crop: {block_size} > {self.config.block_size}"
        self.config.block_size = block_size
        if "wpe" in self.transformer:  # rotary has no table to cut
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """OpenAI GPT-2 weights by hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local transformers folder."""
        override_args = override_args or {}
        assert set(override_args) <= {"dropout"}, "only dropout can be overridden when loading GPT-2"
        from transformers import GPT2LMHeadModel  # only this path needs transformers, so import it here

        hf, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        if info["missing_keys"]:  # transformers would fill them with random weights
            raise ValueError(f"{name_or_path} is not a complete GPT-2 checkpoint: it lacks "
                             f"{', '.join(sorted(info['missing_keys'])[:3])}")
        c = hf.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or c.layer_norm_epsilon != 1e-5 \
                or c.scale_attn_by_inverse_layer_idx or c.reorder_and_upcast_attn or not c.scale_attn_weights:
            raise ValueError(f"{name_or_path} is not a plain GPT-2 (activation, LayerNorm eps or attention scaling differ)")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                           n_embd=c.n_embd, bias=True, dropout=override_args.get("dropout", 0.0))
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf.state_dict()
        if not torch.equal(sd_hf["lm_head.weight"], sd_hf["transformer.wte.weight"]):
            raise ValueError(f"{name_or_path} has an lm_head not tied to wte, which this GPT cannot hold")
        for k, v in sd.items():  # same names; HF's extra keys are non-parameter buffers
            src = sd_hf[k].t() if k.endswith(CONV1D_WEIGHTS) else sd_hf[k]
            if src.shape != v.shape:
                raise ValueError(f"{name_or_path}: {k} has shape {tuple(src.shape)}, expected {tuple(v.shape)}")
            with torch.no_grad():
                v.copy_(src)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices only (lib/optim.py also has Muon and the lr schedules)."""
        from lib import optim

        return optim.create(self, "adamw", learning_rate, weight_decay, betas, device_type)

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter, plus attention (PaLM paper, appendix B)."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over the device's peak FLOP/s (runtime.peak_flops)."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, stop_token=None):
        """
        Continue each sequence of idx (B, T) by max_new_tokens tokens; call in eval mode.
        temperature 0 is greedy; top_k keeps the k likeliest tokens; ids >= vocab_limit (vocab padding) are never
        sampled; generation stops early once every sequence has produced stop_token.
        """
        for idx_next in self.generate_tokens(idx, max_new_tokens, temperature, top_k, vocab_limit, stop_token):
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None, stop_token=None,
                        generators=None, kv_cache=None):
        """
        generate() one step at a time: yields each new (B, 1) token as soon as it is sampled (for streaming).
        generators: one torch.Generator per row, so that a row's text does not depend on what else is in the batch.
        kv_cache: a KVCache that already holds the tokens before idx (a chat's earlier turns): idx is then only what
        it lacks, and the cache is continued (it ends holding all but the last token yielded); once it is full, the
        context is idx's last block_size tokens, run in full. lib/decode.Decoder yields the same tokens faster.
        """
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        new = idx  # the tokens the cache lacks
        if kv_cache is None:
            kv_cache = KVCache(self.config, idx.size(0))
        cached = True  # until the cache is full
        for _ in range(max_new_tokens):
            cached = cached and kv_cache.length + new.size(1) <= kv_cache.shape[3]
            if cached:  # the cache takes the new tokens
                logits, _ = self(new, kv_cache=kv_cache)
            else:  # past block_size the positions shift, so the cropped context is run in full
                logits, _ = self(idx[:, -self.config.block_size:])
            idx_next = draw(next_token_distribution(logits[:, -1, :], temperature, top_k, vocab_limit), generators)
            idx, new = torch.cat((idx, idx_next), dim=1), idx_next
            yield idx_next
            if stop_token is not None:
                done |= idx_next.squeeze(1) == stop_token
                if done.all():
                    break


def next_token_distribution(logits, temperature=1.0, top_k=None, vocab_limit=None):
    """
    What the next token is drawn from, given the last position's logits (B, V): the probabilities (B, V) after
    temperature and top_k, or for temperature 0 the greedy token (B, 1) itself. Ids >= vocab_limit get nothing.
    """
    logits = logits.float()
    if vocab_limit is not None:
        logits[:, vocab_limit:] = -float("inf")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return F.softmax(logits, dim=-1)


def draw(distribution, generators=None):
    """The next tokens (B, 1) from next_token_distribution's answer: a greedy token as it is, else one draw per row
    from the probabilities (from each row's own generator, when given)."""
    if distribution.dtype == torch.long:  # greedy
        return distribution
    if generators is None:
        return torch.multinomial(distribution, num_samples=1)  # (B, 1)
    return torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(distribution, generators)])
