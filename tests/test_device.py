"""
Device code on the device the suite is pointed at: `pytest tests/test_device.py --device=cuda` on a GPU (the
conftest `device` fixture; cpu by default, where these are quick). The forward and backward pass, generation (and
lib/decode.Decoder, on a GPU compiled with CUDA graphs), the training step in each precision (float16 with the grad
scaler on a GPU), the compiled step, and train.py and sample.py as commands. bench/gpu_check.py runs this file.
"""

import pytest
import torch

from conftest import TINY, run
from lib.decode import Decoder
from lib.runtime import autocast, setup_backends
from lib.step import train_step
from model import GPT, GPTConfig

MODERN = dict(rotary=True, rmsnorm=True, qk_norm=True, relu2=True, tie_head=False, logit_softcap=15.0, x0_mix=True,
              bias=False)


def tiny(device="cpu", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, **kwargs))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)  # clear gaps between logits: greedy tokens do not hinge on rounding
    return model.to(device)


class RandomBatches:
    """lib.batches.Batches' interface over random tokens made on the device, the same for a given step."""

    def __init__(self, device, batch_size=4, block_size=32, vocab_size=65):
        self.device, self.shape, self.vocab_size = device, (batch_size, block_size + 1), vocab_size

    def get(self, split, step, micro_step=0):
        g = torch.Generator().manual_seed(1000 * step + micro_step)
        data = torch.randint(self.vocab_size, self.shape, generator=g).to(self.device)
        return data[:, :-1], data[:, 1:]

    def prefetch(self, split, step, micro_step=0):
        pass


@pytest.mark.parametrize("recipe", [{}, MODERN], ids=["gpt2", "modern"])
def test_forward_and_backward_on_the_device_match_the_cpu(device, recipe):
    idx = torch.randint(65, (3, 32), generator=torch.Generator().manual_seed(1))
    grads = []
    for where in ("cpu", device):
        model = tiny(where, **recipe)
        logits, loss = model(idx.to(where), torch.roll(idx, -1, 1).to(where))
        loss.backward()
        grads.append((logits.cpu(), loss.cpu(), [p.grad.cpu() for p in model.parameters()]))
    (l0, loss0, g0), (l1, loss1, g1) = grads
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_generation_on_the_device_matches_the_cpu(device):
    prompt = torch.randint(65, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tiny(**MODERN).eval().generate(prompt, 40, temperature=0)  # past block_size=32: cropped windows
        got = tiny(device, **MODERN).eval().generate(prompt.to(device), 40, temperature=0)
    assert torch.equal(got.cpu(), want)


def test_decoder_on_the_device_yields_generate_tokens_tokens(device):
    """On a GPU compiled, replayed as a CUDA graph (the static cache written in place); on a CPU uncompiled
    (tests/test_decode.py compiles it there)."""
    model = tiny(device, **MODERN).eval()
    decoder = Decoder(model, compile=device != "cpu")
    prompt = torch.randint(65, (3, 4), generator=torch.Generator().manual_seed(3)).to(device)
    try:
        for _ in range(2):  # the second call reuses the cache and the captured graphs
            got = torch.cat(list(decoder.generate_tokens(prompt, 40, temperature=0)), dim=1)
            want = torch.cat(list(model.generate_tokens(prompt, 40, temperature=0)), dim=1)
            assert torch.equal(got, want)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_steps_in_each_precision(device, dtype):
    """A few optimizer steps of lib.step.train_step: the loss falls; float16 goes through the grad scaler."""
    kind = device.split(":")[0]
    if dtype == "float16" and kind == "cpu":
        pytest.skip("float16 trains on a GPU (runtime.pick_dtype refuses it on a CPU)")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    setup_backends(kind)
    model = tiny(device, **MODERN)
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), kind)
    scaler = torch.amp.GradScaler(kind, enabled=dtype == "float16")
    batches, losses = RandomBatches(device), []
    for step in range(8):
        loss, grad_norm, skipped = train_step(model, opt, scaler, batches, step % 2, 1, autocast(kind, dtype), 1.0)
        losses.append(loss.item())
        assert torch.isfinite(grad_norm) and not skipped.item()
    assert losses[-1] < losses[0] - 0.1, losses
    if dtype == "float16":
        assert scaler.get_scale() > 1  # the scaler ran (and never collapsed to a tiny scale)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps float32 weights


def test_compiled_training_step_matches_eager(device):
    from lib.runtime import compile_model

    kind = device.split(":")[0]
    if kind == "cpu":
        pytest.skip("the CPU's compiled step: tests/test_model.py::test_cpu_compiled_training_matches_eager_...")
    x, y = RandomBatches(device).get("train", 0)
    eager = tiny(device, **MODERN)
    compiled_gpt = tiny(device, **MODERN)
    losses = []
    try:
        for model in (eager, compile_model(compiled_gpt, kind)):
            with autocast(kind, "bfloat16" if kind == "cuda" else "float32"):
                _, loss = model(x, y)
            loss.backward()
            losses.append(loss.item())
    finally:
        torch._dynamo.reset()
    assert abs(losses[0] - losses[1]) < 2e-2, losses
    for a, b in zip(eager.parameters(), compiled_gpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=5e-2, rtol=5e-2)


def test_train_and_sample_commands_on_the_device(device, char_data, tmp_path):
    if device == "cpu":
        pytest.skip("on a CPU: tests/test_train.py and tests/test_sampling.py")
    args = [a for a in TINY if not a.startswith(("--device", "--compile"))]
    out = run("train.py", *args, f"--device={device}", "--compile=True", f"--dataset={char_data}",
              f"--out_dir={tmp_path}", "--max_iters=20", "--eval_interval=10")
    assert "compile on" in out.stdout and "saved" in out.stdout, out.stdout
    for compile in ("False", "True"):
        sampled = run("sample.py", f"--out_dir={tmp_path}", f"--device={device}", "--num_samples=2",
                      "--max_new_tokens=40", f"--compile={compile}", "--temperature=0")
        assert sampled.stdout.count("---------------") == 2, sampled.stdout
