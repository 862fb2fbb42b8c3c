"""
Sizing runs and model families: the training horizon from a compute budget, the depth dial, and the power-law fit
that experiments/scaling_sweep.py uses.

    horizon(target_flops, tokens_per_param, flops_per_token, params, tokens_per_iter) -> (max_iters, rule) or None
    depth_dial(depth, aspect=64, head_size=64) -> {"n_layer", "n_embd", "n_head"}
    fit_power_law(N, L) -> (a, alpha, c) with L ~= a * N**-alpha + c

Horizon rules (train.py's target_flops / tokens_per_param; 0 = off, and max_iters decides):
    target_flops = C      tokens D = C / flops_per_token, where flops_per_token = model.flops_per_token() is
                          6 per non-embedding-position parameter plus attention's 12*L*H*Q*T (C ~= 6*N*D + attention)
    tokens_per_param = r  tokens D = r * N (N: model.get_num_params(), Chinchilla's r ~= 20)
and max_iters = ceil(D / tokens_per_iter), at least 1. Setting both is an error. lr_decay_iters follows max_iters
unless it was set explicitly (train.py).

Depth dial: depth = N gives n_layer = N, n_embd = aspect * N (aspect 64 by default: GPT-2 small is depth 12 at
768), and as many heads of head_size (64) as fit, fewer when they would not divide n_embd evenly (at least 1).
A setting given explicitly (n_layer, n_embd, n_head) wins over the dial.
"""

import math

import numpy as np


def horizon(target_flops, tokens_per_param, flops_per_token, params, tokens_per_iter):
    """(max_iters, the rule in words) from a compute budget or a tokens-per-parameter ratio; None when both are 0."""
    if target_flops and tokens_per_param:
        raise ValueError("set target_flops or tokens_per_param, not both")
    if target_flops:
        tokens = target_flops / flops_per_token
        rule = f"target_flops={target_flops:.3g}"
    elif tokens_per_param:
        tokens = tokens_per_param * params
        rule = f"tokens_per_param={tokens_per_param:g}"
    else:
        return None
    return max(1, math.ceil(tokens / tokens_per_iter)), rule


def horizon_settings(config, explicit, gpt, tokens_per_iter):
    """train.py's max_iters and lr_decay_iters (unless explicit) from target_flops or tokens_per_param, and the rule
    in words (horizon_rule, for the run's header); {} when both are 0."""
    from lib.runtime import UserError

    try:
        found = horizon(config["target_flops"], config["tokens_per_param"], gpt.flops_per_token(),
                        gpt.get_num_params(), tokens_per_iter)
    except ValueError as e:
        raise UserError(str(e)) from None
    if found is None:
        return {}
    out = {"max_iters": found[0], "horizon_rule": found[1]}
    out["lr_decay_iters"] = config["lr_decay_iters"] if "lr_decay_iters" in explicit else found[0]
    if config["decay_lr"] and not config["warmup_iters"] < out["lr_decay_iters"]:
        raise UserError(f"{found[1]} gives {found[0]} steps, fewer than warmup_iters={config['warmup_iters']}: "
                        f"lower --warmup_iters or raise the budget")
    return out


def depth_dial(depth, aspect=64, head_size=64):
    """The model shape of a depth: n_layer = depth, n_embd = aspect*depth, heads of ~head_size dividing n_embd."""
    if depth < 1 or aspect < 1:
        raise ValueError(f"depth={depth}, aspect={aspect}: both must be at least 1")
    n_embd = aspect * depth
    n_head = max(1, n_embd // head_size)
    while n_embd % n_head:
        n_head -= 1
    return {"n_layer": depth, "n_embd": n_embd, "n_head": n_head}


def apply_depth_dial(settings, explicit, depth, aspect=64):
    """train.py's settings (a dict, changed in place) with the dial's shape, except those given explicitly."""
    if depth:
        for k, v in depth_dial(depth, aspect).items():
            if k not in explicit:
                settings[k] = v
    return settings


def fit_power_law(N, L, c_grid=400):
    """
    Least squares L ~= a * N**-alpha + c. For a fixed c the model is a line in log space,
    log(L - c) = log a - alpha log N; the c in [0, min L) whose line leaves the smallest squared error in L
    wins (a grid, then a finer grid around the best). Returns (a, alpha, c).
    """
    N, L = np.asarray(N, dtype=float), np.asarray(L, dtype=float)
    if len(N) < 3:
        raise ValueError("a three-parameter fit needs at least 3 points")

    def line(c):
        y = np.log(L - c)
        slope, intercept = np.polyfit(np.log(N), y, 1)
        a, alpha = math.exp(intercept), -slope
        err = float(np.sum((a * N ** -alpha + c - L) ** 2))
        return err, (a, alpha, c)

    lo, hi = 0.0, float(L.min())
    best = None
    for _ in range(4):  # each round zooms into the best cell of the previous one
        cs = np.linspace(lo, hi, c_grid, endpoint=False)
        results = [line(c) for c in cs]
        i = int(np.argmin([r[0] for r in results]))
        best = results[i] if best is None or results[i][0] < best[0] else best
        step = (hi - lo) / c_grid
        lo, hi = max(0.0, cs[i] - step), min(float(L.min()) - 1e-12, cs[i] + step)
    return best[1]


def predict(params, N):
    a, alpha, c = params
    return a * N ** -alpha + c
