"""
Finetuning with frozen layers (train.py's freeze_layers, freeze_train_head, unfreeze_every).

freeze_layers = K freezes the token and position embeddings and the bottom K transformer blocks (0 .. K-1): only
the top n_layer - K blocks train, plus, when freeze_train_head (the default), the final LayerNorm ln_f and the
head. In this GPT-2 architecture the head IS the token embedding (lm_head.weight and transformer.wte.weight are
one tensor), so training the head also changes the input embedding of every token; freeze_train_head=False keeps
both fixed (and ln_f), which is what "freezing the embedding" means here. wpe is frozen whenever any block is.

unfreeze_every = S unfreezes one more block every S steps, from the top down (progressive unfreezing): at step k
the frozen blocks are 0 .. frozen_blocks(K, S, k) - 1 with frozen_blocks = max(0, K - k // S); once it reaches 0
the embeddings (and ln_f / head if they were frozen) unfreeze too and everything trains. The trainable set is a
pure function of (K, S, freeze_train_head, k), so a resumed run rebuilds the same optimizer groups before loading
the optimizer state, and resume stays exact.

The optimizer holds only trainable parameters (model.configure_optimizers keeps requires_grad ones); unfreeze()
adds the newly trainable ones as new param groups with the hyperparameters of their kind (weight decay on
matrices only). NOTE for lib/optim.py: adding groups mid-run is done in unfreeze() alone.
"""

from lib.runtime import UserError


def frozen_blocks(freeze_layers, unfreeze_every, step):
    if unfreeze_every > 0:
        return max(0, freeze_layers - step // unfreeze_every)
    return freeze_layers


def trainable_names(model, freeze_layers, unfreeze_every, train_head, step):
    """The names of the parameters that train at `step` (model.named_parameters(), tied weights once)."""
    k = frozen_blocks(freeze_layers, unfreeze_every, step)
    names = []
    for name, _ in model.named_parameters():
        if k == 0:
            names.append(name)
        elif name.startswith("transformer.h."):
            if int(name.split(".")[2]) >= k:
                names.append(name)
        elif name.startswith(("transformer.ln_f.", "lm_head.", "transformer.wte.")):
            if train_head:
                names.append(name)
        # transformer.wpe and anything else: frozen while any block is
    return set(names)


def freeze(model, freeze_layers, unfreeze_every, train_head, step, world_size=1):
    """Set requires_grad for `step` (call before the optimizer is built). Returns (trainable, total) counts."""
    if not 0 <= freeze_layers <= model.config.n_layer:
        raise UserError(f"freeze_layers={freeze_layers}: the model has {model.config.n_layer} layers")
    if freeze_layers and unfreeze_every and world_size > 1:  # DDP registers the parameters it syncs once, at start
        raise UserError("unfreeze_every needs a single process: DDP cannot add parameters during a run")
    keep = trainable_names(model, freeze_layers, unfreeze_every, train_head, step)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return counts(model)


def counts(model):
    params = list(model.parameters())  # tied weights once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def unfreeze(model, optimizer, freeze_layers, unfreeze_every, train_head, step, weight_decay, lr):
    """
    At `step`, make trainable what the schedule says and give the optimizer those parameters (new groups: matrices
    with weight_decay, the rest without). Returns the names newly unfrozen (empty on most steps).
    """
    if not (freeze_layers and unfreeze_every) or step % unfreeze_every:
        return []
    keep = trainable_names(model, freeze_layers, unfreeze_every, train_head, step)
    new = [(n, p) for n, p in model.named_parameters() if n in keep and not p.requires_grad]
    if not new:
        return []
    for _, p in new:
        p.requires_grad_(True)
    template = optimizer.param_groups[0]
    for decay, ps in ((weight_decay, [p for _, p in new if p.dim() >= 2]), (0.0, [p for _, p in new if p.dim() < 2])):
        if ps:
            group = {k: v for k, v in template.items() if k != "params"}
            optimizer.add_param_group({**group, "params": ps, "weight_decay": decay, "lr": lr})
    return [n for n, _ in new]


def describe(model, names):
    """One line on what unfreeze() just did: which blocks (or embeddings, head), and how many parameters train now."""
    parts = sorted({f"block {n.split('.')[2]}" if n.startswith("transformer.h.") else n.split(".")[-2] for n in names})
    trainable, total = counts(model)
    return f"unfroze {', '.join(parts)}: {trainable:,} of {total:,} parameters train now"


def catch_up(model, optimizer, freeze_layers, unfreeze_every, train_head, step, weight_decay, lr):
    """
    A run resumed at `step`: redo the unfreezes of the steps before it on the optimizer built for step 0, so its
    groups are those (and in the order) of the uninterrupted run when the checkpoint's optimizer state is loaded.
    """
    if freeze_layers and unfreeze_every:
        for s in range(unfreeze_every, min(step - 1, freeze_layers * unfreeze_every) + 1, unfreeze_every):
            unfreeze(model, optimizer, freeze_layers, unfreeze_every, train_head, s, weight_decay, lr)
