"""
Optimizers and learning-rate schedules, for train.py and bench.py.

    optimizer = optim.create(model, optimizer="muon", learning_rate=..., muon_lr=..., ...)
    optim.set_lr(optimizer, lr)  # lr from optim.get_lr(it, ...) each step

'adamw': AdamW over every parameter; weight decay on matrices (Linear weights, embeddings), none on biases and gains.
'muon':  Muon (torch.optim.Muon batched by shape: orthogonalized momentum, Newton-Schulz in bfloat16) for the
         hidden matrices, chosen by module: the nn.Linear weights inside the transformer blocks (c_attn, c_proj,
         c_fc), never by ndim (wte, wpe and lm_head are 2-D too but belong to AdamW), at lr muon_lr (0.02 in
         torch's docstring and modded-nanogpt); plus AdamW at learning_rate for embeddings, the head, gains,
         biases and the embedding-shortcut mix. Every trainable parameter must be in exactly one group (asserted).

Each parameter group carries lr_scale = its base lr / learning_rate; set_lr puts lr * lr_scale in each group, so the
schedule is one multiplier of every group's base lr (nanochat style), and the AdamW groups (lr_scale 1.0) get the
schedule's value itself, bit for bit what train.py's get_lr gave before.
"""

import inspect
import math

import torch
import torch.nn as nn

from lib.runtime import UserError

# train.py's recipe switch: the settings each recipe sets (a config file or the command line still wins)
RECIPES = {
    "gpt2": dict(rotary=False, rmsnorm=False, qk_norm=False, relu2=False, zero_init=False, tie_head=True,
                 logit_softcap=0.0, x0_mix=False, optimizer="adamw", lr_schedule="cosine"),
    "modern": dict(rotary=True, rmsnorm=True, qk_norm=True, relu2=True, zero_init=True, tie_head=False,
                   logit_softcap=15.0, x0_mix=True, bias=False, optimizer="muon", lr_schedule="wsd"),
}


def recipe_settings(recipe, explicit):
    """What `recipe` sets in a run: its RECIPES entry, less the keys the run's config files or command line set."""
    if recipe not in RECIPES:
        raise UserError(f"recipe={recipe!r} is not one of {', '.join(map(repr, RECIPES))}")
    return {k: v for k, v in RECIPES[recipe].items() if k not in explicit}


def adamw(groups, learning_rate, betas, device_type):
    # fused AdamW is one kernel per step, and it skips the update on device when `found_inf` is set (no host sync)
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def adamw_groups(params, weight_decay):
    """Weight decay on matrices (dim >= 2) only; biases, gains and mixing scalars are not decayed."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]


def hidden_matrices(model):
    """The weights of the nn.Linear modules inside the transformer blocks: Muon's parameters."""
    return [m.weight for block in model.transformer.h for m in block.modules()
            if isinstance(m, nn.Linear) and m.weight.requires_grad]


def check_groups(model, optimizers):
    """Every trainable parameter in exactly one group of one optimizer (modded-nanogpt's check)."""
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in more than one optimizer group"
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in set(seen)]
    assert not left_out, f"parameters in no optimizer group: {', '.join(left_out)}"


class BatchedMuon(torch.optim.Muon):
    """
    torch.optim.Muon with its matrices stacked by shape: one Newton-Schulz iteration on a (layers, m, n) batch
    instead of one per matrix. Same update (bit for bit on CPU, tested), same hyperparameters, same state_dict;
    the step of a 4-layer 128-wide model takes 5.6 instead of 8.6 ms on 2 CPU cores, where torch's many small
    matmuls dominated it. Only the default lr adjustment (adjust_lr_fn=None: lr * sqrt(max(1, rows / cols))).
    """

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None
        for group in self.param_groups:
            assert group["adjust_lr_fn"] in (None, "original"), "BatchedMuon has only the original lr adjustment"
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            lr, momentum = group["lr"], group["momentum"]
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:  # (setdefault would build a new zeros each step)
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                update = torch.stack(grads).lerp_(torch.stack(bufs), momentum) if group["nesterov"] \
                    else torch.stack(bufs)
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-lr * math.sqrt(max(1, shape[0] / shape[1])))


def newton_schulz(G, coefficients, steps, eps):
    """torch.optim.Muon's orthogonalization (quintic Newton-Schulz in bfloat16) of each matrix in G (batch, m, n)."""
    a, b, c = coefficients
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller one
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A^2) X
    return X.mT if G.size(-2) > G.size(-1) else X


class MuonAdamW:
    """
    Muon for the hidden matrices plus AdamW for the rest, stepped together: one step updates both, or neither.
    param_groups are both optimizers' (set_lr sets them all); state_dict() is {'muon': ..., 'adamw': ...}.
    """

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw
        self.optimizers = (muon, adamw)

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces the optimizers' group dicts
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, skipped=None, scaler=None):
        """
        skipped: a 0-d bool tensor, True when the gradients are not finite: then neither optimizer changes anything.
        Muon has no found_inf argument, so the host decides: one sync per step (the fused-AdamW path has none).
        With a float16 GradScaler (unscale_ already called on both) the scaler skips and adapts as usual.
        """
        if skipped is not None and skipped.item():
            if scaler is not None and scaler.is_enabled():
                scaler.update()  # lower the scale after an overflow, as scaler.step + update would
            return
        for opt in self.optimizers:
            scaler.step(opt) if scaler is not None and scaler.is_enabled() else opt.step()
        if scaler is not None and scaler.is_enabled():
            scaler.update()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        if set(state) != {"muon", "adamw"}:
            raise UserError("the checkpoint's optimizer state is not Muon + AdamW: resume with the optimizer it was "
                            "trained with (--optimizer=adamw), or train from scratch in a new --out_dir")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def create(model, optimizer="adamw", learning_rate=6e-4, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
           muon_lr=0.02, muon_momentum=0.95, parallelism=None):
    """The optimizer train.py steps: a torch AdamW ('adamw') or a MuonAdamW ('muon'), every group with an lr_scale."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = adamw(adamw_groups(params, weight_decay), learning_rate, betas, device_type)
        check_groups(model, [opt])
        return opt
    if optimizer != "muon":
        raise UserError(f"optimizer={optimizer!r} is not one of 'adamw', 'muon'")
    if parallelism == "fsdp":
        raise UserError("optimizer='muon' does not work with parallelism='fsdp' (Muon needs whole matrices, FSDP "
                        "shards them): use --optimizer=adamw, or DDP")
    hidden = hidden_matrices(model)
    ids = {id(p) for p in hidden}
    muon = BatchedMuon([{"params": hidden, "lr_scale": muon_lr / learning_rate if learning_rate else 0.0}],
                            lr=muon_lr, weight_decay=weight_decay, momentum=muon_momentum, nesterov=True)
    rest = adamw(adamw_groups([p for p in params if id(p) not in ids], weight_decay), learning_rate, betas, device_type)
    check_groups(model, [muon, rest])
    return MuonAdamW(muon, rest)


def set_lr(optimizer, lr):
    """lr is the schedule's value for learning_rate; each group gets lr * its lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, schedule="cosine", cooldown_frac=0.4,
           final_lr_frac=0.0):
    """
    The learning rate at step it (for learning_rate; other groups scale it by their lr_scale).
    'cosine': linear warmup (non-zero at it=0), then cosine decay from learning_rate to min_lr at lr_decay_iters.
    'wsd':    the same warmup, then constant (stable), then a linear cooldown over the last cooldown_frac of
              lr_decay_iters down to final_lr_frac * learning_rate, held there after lr_decay_iters.
    """
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == "wsd":
        cooldown_start = lr_decay_iters - cooldown_frac * lr_decay_iters
        if it < cooldown_start:
            return learning_rate
        if it >= lr_decay_iters:
            return final_lr_frac * learning_rate
        progress = (it - cooldown_start) / (lr_decay_iters - cooldown_start)  # 0 -> 1 over the cooldown
        return learning_rate * (1.0 - progress * (1.0 - final_lr_frac))
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 down to 0
    return min_lr + coeff * (learning_rate - min_lr)
