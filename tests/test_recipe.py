"""The modern recipe (issue 12): model options, Muon + AdamW, WSD, checkpoints and export of a non-GPT-2 model."""

import math
import os
import re

import pytest
import torch
from torch.nn import functional as F

import model as model_module
from conftest import TINY, run
from lib import checkpoint, optim
from lib.batches import Batches
from lib.kernels import rms_norm
from lib.runtime import UserError, autocast
from lib.step import train_step
from model import GPT, GPTConfig, apply_rotary, rotary

SMALL = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)
MODERN = {k: v for k, v in optim.RECIPES["modern"].items() if k in GPTConfig.__dataclass_fields__}


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **kw}))


def test_gpt2_recipe_is_the_old_model():
    """Every option at its GPT-2 value: the same parameters (names, shapes, order), init and logits as before."""
    old = build(bias=True)
    gpt2 = build(bias=True, **{k: v for k, v in optim.RECIPES["gpt2"].items() if k in GPTConfig.__dataclass_fields__})
    names = [n for n, _ in old.named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"] and len(names) == 2 + 2 * 12 + 2
    assert [(n, p.shape) for n, p in gpt2.named_parameters()] == [(n, p.shape) for n, p in old.named_parameters()]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied
    idx = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(gpt2(idx, idx)[0], old(idx, idx)[0])


def test_modern_model_has_no_position_table_biases_or_gains_and_an_untied_head():
    m = build(**MODERN)
    names = {n for n, _ in m.named_parameters()}
    assert "transformer.wpe.weight" not in names and not any(n.endswith(".bias") for n in names)
    assert not any("ln_" in n for n in names) and "lm_head.weight" in names and "transformer.wte.weight" in names
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert all(torch.count_nonzero(p) == 0 for n, p in m.named_parameters() if n.endswith("c_proj.weight"))
    idx = torch.randint(65, (2, 16))
    _, loss = m(idx, idx)
    assert abs(loss.item() - math.log(65)) < 0.1 * math.log(65)
    # MFU and the header: 6 x the matmul weights (head included, embedding lookups not) + attention
    matmuls = sum(p.numel() for n, p in m.named_parameters() if n.endswith(("c_attn.weight", "c_proj.weight",
                                                                           "c_fc.weight", "lm_head.weight")))
    mixes = sum(p.numel() for n, p in m.named_parameters() if "x0_mix" in n)
    assert m.get_num_params() == matmuls + mixes
    assert m.flops_per_token() == 6 * (matmuls + mixes) + 12 * 2 * 2 * 16 * 16


def test_rms_norm_is_torch_rms_norm_in_value_and_gradient():
    """kernels.rms_norm (hand-written backward) against F.rms_norm and autograd; float32 out under bf16 autocast."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    ref, got = F.rms_norm(x, (16,)), rms_norm(x)
    assert got.dtype == torch.float64 and torch.allclose(got, ref)
    g = torch.randn_like(ref)
    assert torch.allclose(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    assert torch.autograd.gradcheck(rms_norm, (x,))
    xb = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(xb.bfloat16())  # what a bfloat16 Linear hands it
    assert y.dtype == torch.float32 and torch.allclose(y, F.rms_norm(xb.bfloat16().float(), (32,)))
    y.sum().backward()
    assert xb.grad.dtype == torch.float32 and torch.isfinite(xb.grad).all()


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    pos = torch.arange(8)
    a = apply_rotary(q, *rotary(pos, 16)) @ apply_rotary(k, *rotary(pos, 16)).transpose(-1, -2)
    b = apply_rotary(q, *rotary(pos + 37, 16)) @ apply_rotary(k, *rotary(pos + 37, 16)).transpose(-1, -2)
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, q @ k.transpose(-1, -2), atol=1e-2)  # it does rotate


def test_rotary_model_with_kv_cache_matches_full_forward():
    m = build(rotary=True).eval()
    idx = torch.randint(65, (1, 12))
    greedy = m.generate(idx[:, :4], 8, temperature=0)  # KV cache: positions continue from the cache's length
    full = idx[:, :4]
    for _ in range(8):
        logits, _ = m(full, full)
        full = torch.cat([full, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, full)


def test_qk_norm_fixes_query_and_key_norms(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q, k))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    m = build(qk_norm=True, rotary=True)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(7.0)  # whatever the weights' scale
        m(torch.randint(65, (2, 16)))
    assert len(seen) == 2
    for q, k in seen:
        for t in (q, k):
            assert torch.allclose(t.norm(dim=-1), torch.full(t.shape[:-1], math.sqrt(16.0)), rtol=1e-3)


def test_softcap_bounds_the_logits():
    m = build(logit_softcap=3.0)
    with torch.no_grad():
        m.lm_head.weight.mul_(1000.0)
    idx = torch.randint(65, (2, 16))
    logits, _ = m(idx, idx)
    assert logits.abs().max() <= 3.0 and logits.abs().max() > 2.9
    m.config.logit_softcap = 0.0
    assert m(idx, idx)[0].abs().max() > 100  # what the cap squashed


def test_muon_steps_only_the_blocks_linear_weights():
    m = build(**MODERN)
    opt = optim.create(m, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu", muon_lr=0.02)
    names = {id(p): n for n, p in m.named_parameters()}
    in_muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    hidden = r"transformer\.h\.\d\.(attn|mlp)\.c_\w+\.weight"
    assert in_muon == sorted(n for n in names.values() if re.fullmatch(hidden, n))
    assert all(p.dim() == 2 for g in opt.muon.param_groups for p in g["params"])
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.clone() for n, p in m.named_parameters()}
    opt.muon.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != (n in in_muon), n


def test_batched_muon_is_torch_muon_bit_for_bit():
    """Matrices of three shapes, two of each, nesterov on and off: the same weights and momentum after 3 steps."""
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 32), (32, 128)] * 2
    for nesterov in (True, False):
        ours = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
        theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
        opts = optim.BatchedMuon(ours, **kw), torch.optim.Muon(theirs, **kw)
        for _ in range(3):
            for p, q in zip(ours, theirs):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            for opt in opts:
                opt.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p, q) and not torch.equal(p, torch.zeros_like(p))
            assert torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"])


def test_group_assertion_fires_on_a_parameter_left_out(monkeypatch):
    m = build(**MODERN)
    monkeypatch.setattr(optim, "hidden_matrices", lambda model: [model.transformer.h[0].attn.c_attn.weight])
    adamw_groups = optim.adamw_groups
    monkeypatch.setattr(optim, "adamw_groups", lambda params, wd: adamw_groups(
        [p for p in params if p is not m.transformer.h[1].mlp.c_fc.weight], wd))
    with pytest.raises(AssertionError, match="no optimizer group: .*h.1.mlp.c_fc.weight"):
        optim.create(m, "muon")


def test_muon_refuses_fsdp():
    with pytest.raises(UserError, match="fsdp"):
        optim.create(build(), "muon", parallelism="fsdp")


@pytest.mark.parametrize("recipe", ["muon-gpt2", "modern"])
def test_tiny_model_overfits_one_batch_with_muon(recipe):
    m = build(**(MODERN if recipe == "modern" else {}))
    opt = optim.create(m, "muon", 3e-3, 0.0, (0.9, 0.95), "cpu", muon_lr=0.02)
    idx = torch.randint(65, (4, 17), generator=torch.Generator().manual_seed(2))
    for _ in range(150):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1


def old_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """train.py's get_lr before lib/optim.py: the cosine schedule must stay bit for bit this."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_cosine_is_the_old_schedule_and_set_lr_scales_groups():
    for it in range(0, 2200, 7):
        assert optim.get_lr(it, 6e-4, 100, 2000, 6e-5) == old_get_lr(it, 6e-4, 100, 2000, 6e-5)
    opt = optim.create(build(**MODERN), "muon", 1e-3, 0.1, (0.9, 0.95), "cpu", muon_lr=0.02)
    optim.set_lr(opt, 5e-4)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.01), 5e-4, 5e-4]


def test_wsd_boundaries():
    lr = lambda it: optim.get_lr(it, 1.0, 10, 100, 0.1, "wsd", cooldown_frac=0.4, final_lr_frac=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(1 / 11) and lr(9) == pytest.approx(10 / 11)  # warmup
    assert lr(10) == lr(35) == lr(59) == 1.0  # stable until the cooldown starts at 100 - 40 = 60
    assert lr(60) == 1.0 and lr(80) == pytest.approx(0.55) and lr(99) == pytest.approx(1 - 39 / 40 * 0.9)
    assert lr(100) == lr(500) == pytest.approx(0.1)  # the final fraction, held
    assert all(lr(i) >= lr(i + 1) for i in range(10, 120))


def test_skipped_step_leaves_weights_and_both_optimizers_untouched(char_data):
    m = build(**MODERN, block_size=32)
    opt = optim.create(m, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches, ctx = Batches(char_data, 32, 4, "cpu"), autocast("cpu", "float32")
    poison = {"on": False}
    m.transformer.ln_f.register_forward_hook(lambda mod, i, out: out * float("nan") if poison["on"] else out)
    step = lambda it: train_step(m, opt, scaler, batches, it, 2, ctx, grad_clip=1.0)  # noqa: E731
    assert not step(0)[2].item()
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    state = {k: {i: {n: t.clone() for n, t in s.items()} for i, s in sd["state"].items()}
             for k, sd in opt.state_dict().items()}
    assert state["muon"] and state["adamw"]
    poison["on"] = True
    assert step(1)[2].item()
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())
    for k, sd in opt.state_dict().items():
        for i, s in sd["state"].items():
            assert all(torch.equal(t, state[k][i][n]) for n, t in s.items()), (k, i)
    poison["on"] = False
    assert not step(2)[2].item()
    assert not torch.equal(m.state_dict()["lm_head.weight"], weights["lm_head.weight"])


def train(char_data, out_dir, *args):
    return run("train.py", *TINY, f"--dataset={char_data}", f"--out_dir={out_dir}", *args)


def losses(stdout):
    return {int(i): v for i, v in re.findall(r"^iter (\d+): loss (\S+),", stdout, re.M)}


@pytest.mark.slow
def test_resume_with_muon_and_wsd_is_bit_exact(char_data, tmp_path):
    common = ["--recipe=modern", "--gradient_accumulation_steps=2", "--eval_interval=3", "--lr_decay_iters=8",
              "--cooldown_frac=0.5", "--final_lr_frac=0.1"]
    whole = train(char_data, tmp_path / "whole", *common, "--max_iters=8").stdout
    pieces = train(char_data, tmp_path / "pieces", *common, "--max_iters=4").stdout
    pieces += train(char_data, tmp_path / "pieces", *common, "--max_iters=8", "--init_from=resume").stdout
    assert len(losses(whole)) == 8 and losses(pieces) == losses(whole)
    a = checkpoint.load(str(tmp_path / "whole" / "ckpt.pt"))
    b = checkpoint.load(str(tmp_path / "pieces" / "ckpt.pt"))
    assert a["model_args"]["rotary"] and not a["model_args"]["tie_head"] and set(a["optimizer"]) == {"muon", "adamw"}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for name in ("muon", "adamw"):
        for sa, sb in zip(a["optimizer"][name]["state"].values(), b["optimizer"][name]["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_old_checkpoint_without_new_keys_still_loads(tmp_path):
    m = build(bias=True)
    args = {k: getattr(m.config, k) for k in checkpoint.GPT2_KEYS + ("dropout",)}  # as older versions saved
    state = dict(model=m.state_dict(), model_args=args, iter_num=3, best_val_loss=2.0, config={}, meta={})
    loaded = checkpoint.model_from_checkpoint(state)
    assert not loaded.config.rotary and loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(65, (1, 16))
    assert torch.equal(loaded(idx, idx)[0], m(idx, idx)[0])
    checkpoint.check_model_args(state, "ckpt.pt", {"rotary": False}, {"rotary"})  # agrees with the default
    with pytest.raises(UserError, match="rotary=False"):
        checkpoint.check_model_args(state, "ckpt.pt", {"rotary": True}, {"rotary"})


def test_export_refuses_a_modern_model_in_one_line(tmp_path):
    m = build(**{**MODERN, "tie_head": True})
    args = {k: getattr(m.config, k) for k in checkpoint.ARCH_KEYS + ("dropout",)}
    checkpoint.save(dict(model=m.state_dict(), model_args=args, iter_num=1, best_val_loss=2.0, config={}, meta={}),
                    str(tmp_path))
    proc = run("export.py", f"--out_dir={tmp_path}", f"--hf_dir={tmp_path / 'hf'}", "--ckpt=latest", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: ") and "rotary=True" in proc.stderr and not os.path.exists(tmp_path / "hf")


@pytest.mark.slow
def test_muon_under_ddp_trains(char_data, tmp_path):
    """Two gloo ranks with the modern recipe: Muon steps on the all-reduced gradients, the run finishes and saves."""
    from test_distributed import torchrun

    proc = torchrun(*TINY, f"--dataset={char_data}", f"--out_dir={tmp_path}", "--recipe=modern", "--max_iters=4",
                    "--eval_interval=4", "--gradient_accumulation_steps=2", "--lr_decay_iters=4")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "2 process(es)" in out and re.search(r"^iter 4: loss \d", out, re.M)
    state = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert state["iter_num"] == 4 and set(state["optimizer"]) == {"muon", "adamw"}
