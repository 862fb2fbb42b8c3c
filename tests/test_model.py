"""The model's behaviour: initial loss, learning, causality, generation (greedy, top-k, KV cache), cropping."""

import math

import pytest
import torch

from model import GPT, GPTConfig


def tiny(vocab_size=65, block_size=16, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32,
                         dropout=dropout, bias=bias))


def full_logits(model, idx):
    """Logits at every position (forward returns them all when given targets)."""
    logits, _ = model(idx, torch.zeros_like(idx))
    return logits


@pytest.mark.parametrize("vocab_size", [65, 1000])
def test_loss_at_init_is_log_vocab(vocab_size):
    model = tiny(vocab_size)
    idx = torch.randint(vocab_size, (8, 16), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, torch.roll(idx, -1, dims=1))
    assert abs(loss.item() - math.log(vocab_size)) < 0.05 * math.log(vocab_size)


def test_overfits_one_batch():
    model = tiny()
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")
    idx = torch.randint(65, (4, 17), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1], idx[:, 1:]
    for _ in range(300):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert loss.item() < 0.05


@pytest.mark.parametrize("bias", [True, False])
def test_causal(bias):
    model = tiny(bias=bias).eval()
    idx = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(3))
    for t in range(15):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 65
        a, b = full_logits(model, idx), full_logits(model, changed)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1]), f"logits at <= {t} depend on token {t + 1}"
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])  # the changed position does see its own token


def greedy_without_cache(model, idx, steps):
    for _ in range(steps):
        logits = full_logits(model, idx[:, -model.config.block_size:])[:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


def test_greedy_generate_is_deterministic_and_matches_full_recompute():
    model = tiny().eval()
    prompt = torch.randint(65, (3, 5), generator=torch.Generator().manual_seed(4))
    out = model.generate(prompt, 30, temperature=0)  # runs past block_size=16: cache, then cropped windows
    assert out.shape == (3, 35) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, 30, temperature=0))
    assert torch.equal(out, greedy_without_cache(model, prompt, 30))


def test_kv_cache_logits_match_full_forward():
    from model import KVCache

    model = tiny().eval()
    idx = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(5))
    cache = KVCache(model.config, 2)
    steps = [model(idx[:, :6], kv_cache=cache)[0][:, -1]]
    steps += [model(idx[:, t:t + 1], kv_cache=cache)[0][:, -1] for t in range(6, 16)]
    full = full_logits(model, idx)[:, 5:]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_top_k_1_equals_greedy_and_sampling_follows_the_seed():
    model = tiny().eval()
    prompt = torch.randint(65, (2, 4), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(prompt, 20, temperature=0)
    torch.manual_seed(123)
    assert torch.equal(model.generate(prompt, 20, temperature=1.0, top_k=1), greedy)
    torch.manual_seed(7)
    a = model.generate(prompt, 20, temperature=1.0)
    torch.manual_seed(7)
    assert torch.equal(a, model.generate(prompt, 20, temperature=1.0))
    torch.manual_seed(8)
    assert not torch.equal(a, model.generate(prompt, 20, temperature=1.0))


def test_vocab_limit_and_stop_token():
    model = tiny(vocab_size=80).eval()
    with torch.no_grad():
        model.lm_head.weight[70:] *= 50  # make the "padding" rows the likeliest tokens
    prompt = torch.randint(65, (4, 3), generator=torch.Generator().manual_seed(9))
    assert (model.generate(prompt, 20, temperature=0)[:, 3:] >= 70).any()  # without the limit they win
    torch.manual_seed(0)
    out = model.generate(prompt, 20, temperature=2.0, vocab_limit=70)
    assert (out < 70).all()
    greedy = model.generate(prompt[:1], 10, temperature=0, vocab_limit=70)
    stop = greedy[0, 5].item()  # a token greedy decoding emits: generation must end right there
    out = model.generate(prompt[:1], 10, temperature=0, vocab_limit=70, stop_token=stop)
    assert out[0, -1].item() == stop and out.size(1) <= greedy.size(1)
    assert torch.equal(out[0], greedy[0, : out.size(1)])


def test_crop_block_size_keeps_short_inputs_exact():
    model = tiny(block_size=16).eval()
    idx = torch.randint(65, (2, 8), generator=torch.Generator().manual_seed(10))
    before = full_logits(model, idx)
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape[0] == 8
    torch.testing.assert_close(full_logits(model, idx), before, rtol=0, atol=0)
    with pytest.raises(AssertionError):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_init_scales_residual_projections_and_ties_embeddings():
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=8, n_head=4, n_embd=256))
    assert model.lm_head.weight is model.transformer.wte.weight
    c_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    c_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(c_fc - 0.02) < 0.002
    assert abs(c_proj - 0.02 / math.sqrt(2 * 8)) < 0.001


def test_optimizer_decays_matrices_only():
    model = tiny()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_generate_under_bfloat16_autocast_matches_full_recompute():
    model = tiny().eval()
    prompt = torch.randint(65, (2, 5), generator=torch.Generator().manual_seed(11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(prompt, 8, temperature=0)
        assert torch.equal(out, greedy_without_cache(model, prompt, 8))


def test_cpu_bfloat16_autocast_attention_is_flash_attention_in_value_and_gradient():
    """kernels.attention under CPU bfloat16 autocast (written out in bfloat16 there): the same attention as float32
    flash, causal over a sequence and for one new query against cached keys, values and gradients within bfloat16's
    rounding; with dropout it still runs float32 flash."""
    from torch.nn import functional as F

    from lib.kernels import attention

    for T, T_k, causal in ((8, 8, True), (1, 8, False)):
        q, k, v = (torch.randn(2, 3, n, 16, generator=torch.Generator().manual_seed(i)).bfloat16().requires_grad_()
                   for i, n in enumerate((T, T_k, T_k)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attention(q, k, v, 0.0, is_causal=causal)
        assert y.dtype == torch.bfloat16 and y.shape == q.shape
        qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
        y_ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
        assert (y.float() - y_ref).abs().max() < 0.03
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
        grads = torch.autograd.grad(y.float(), (q, k, v), g)
        grads_ref = torch.autograd.grad(y_ref, (qf, kf, vf), g)
        for a, b in zip(grads, grads_ref):
            assert (a.float() - b).abs().max() < 0.05 * b.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q, k, v, 0.1, is_causal=False).dtype == torch.float32  # dropout: float32 flash


@pytest.mark.slow
@pytest.mark.xdist_group("inductor")  # with test_bench's compiled preset: one worker compiles, the other waits less
def test_cpu_compiled_training_matches_eager_and_repeats_bit_for_bit():
    """runtime.compile_model on a CPU, as the CPU preset trains (its model, batch and dtype, on parallel threads): the
    loss and gradients of eager mode (to bfloat16 rounding), and the same bits on every step, as eager mode gives
    (resume relies on it). Without deterministic algorithms Inductor adds the embedding's gradient rows with atomic
    adds from parallel threads, in a new order each time. (test_bench times the preset compiled: the same kernels,
    which Inductor's cache then compiles only once.)"""
    import os
    import runpy

    from conftest import REPO
    from lib import optim
    from lib.runtime import autocast, compile_model, pick_dtype

    preset = runpy.run_path(os.path.join(REPO, "config/train_shakespeare_char_cpu.py"))
    settings = {**optim.recipe_settings(preset["recipe"], set(preset)), **preset, "vocab_size": 65}
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{k: v for k, v in settings.items() if k in GPTConfig.__dataclass_fields__}))
    assert gpt.config.rotary and gpt.config.rmsnorm and gpt.config.n_embd == 128  # the preset's modern model
    for p in gpt.parameters():  # zero_init's zeros would leave most gradients zero
        torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(65, (settings["batch_size"], settings["block_size"] + 1),
                        generator=torch.Generator().manual_seed(3))
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()  # as train.py's batches come
    dtype = pick_dtype("auto", "cpu")  # bfloat16 where the CPU has it, else float32

    def loss_and_grads(model):
        gpt.zero_grad(set_to_none=True)
        with autocast("cpu", dtype):
            _, loss = model(x, y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in gpt.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(gpt)
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # parallel threads, as the preset has (the tests run with one)
    try:
        compiled = compile_model(gpt, "cpu")
        runs = [loss_and_grads(compiled) for _ in range(6)]
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    loss, grads = runs[0]
    assert abs(loss.item() - eager_loss.item()) < 1e-2, (loss, eager_loss)
    for name, g in grads.items():
        scale = eager_grads[name].abs().max().item()
        assert scale > 0 and (g - eager_grads[name]).abs().max().item() < 0.05 * scale, name
    for later_loss, later_grads in runs[1:]:
        assert torch.equal(later_loss, loss)
        for name, g in grads.items():
            assert torch.equal(later_grads[name], g), f"{name}: the compiled backward gave other bits this time"
