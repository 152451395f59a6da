"""The divergence guard's numerics: when an update is skipped, when an adapted state is unusable, and the same rules
for a stack of per-example parameter copies (tta.per_example). The Adapter (tta.adapter) applies them and counts
what they find in `guard_events`; here they are plain functions of tensors, so both places share one definition.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

COLLAPSE_MIN_BATCH = 16  # the smallest batch whose predictions the guard calls a collapse (collapsed_to_one_class)
Count = Callable[[str, int], None]  # records `times` guard interventions of one kind (Adapter.count_guard_event)


def finite_and_largest(t: torch.Tensor, per_slice: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Whether all values of t are finite, and their largest magnitude; with per_slice, for each slice along dim 0.
    From one max and one min, which propagate NaN and show +-inf: several times faster than isfinite(t).all() on
    the weights and gradients of large models, which the guard checks at every step."""
    flat = t.reshape(t.shape[0] if per_slice else 1, -1)
    if flat.shape[1] == 0:
        return torch.ones(flat.shape[0], dtype=torch.bool), torch.zeros(flat.shape[0])
    hi, lo = flat.amax(1), flat.amin(1)
    finite, largest = torch.isfinite(hi) & torch.isfinite(lo), torch.maximum(hi, -lo)
    return (finite, largest) if per_slice else (finite[0], largest[0])


def explosion_limit(source: torch.Tensor) -> float:
    """The largest weight magnitude the guard accepts for a parameter whose source value is `source`: a
    thousandfold its source scale (still finite beyond it, but the predictions such weights give are arbitrary)."""
    return 1e3 * (float(source.detach().abs().max()) + 1.0)


def check_step_fits(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose step would overflow its parameters' dtype: torch converts lr, weight decay and
    Adam's step size lr / (1 - beta1 ** step) (largest at the first step) to that dtype and raises half-way through
    the step, with some parameters or moments already updated. Checked before each step, nothing changes then.
    The declared config ranges keep float32 and bfloat16 safe; float16 (largest value 65504) needs this."""
    for group in optimizer.param_groups:
        lr, decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
        scalars = {"lr": lr, "weight_decay": decay}
        if "betas" in group:
            scalars["lr / (1 - betas[0])"] = lr / (1.0 - group["betas"][0])
            scalars["lr * weight_decay"] = lr * decay
        for dtype in {p.dtype for p in group["params"] if p.is_floating_point()}:
            largest = torch.finfo(dtype).max
            for name, value in scalars.items():
                if not value <= largest:
                    raise ValueError(f"the optimizer step multiplies {str(dtype).replace('torch.', '')} weights by "
                                     f"{name} = {value:g}, beyond that type's largest value {largest:g}, which no "
                                     "step can survive: use a smaller lr (or weight_decay), or keep the adapted "
                                     "weights in float32")


# ---- one adapted state ---------------------------------------------------------------------------------------
def skipped_update(loss: Optional[float], params: Iterable[torch.Tensor]) -> Optional[str]:
    """Why an update on these accumulated gradients must be skipped: "nonfinite_loss" when `loss` (the value they
    came from, when known) is not finite, "nonfinite_grad" when a gradient is not; None when it may go ahead."""
    if loss is not None and not math.isfinite(loss):
        return "nonfinite_loss"
    if any(p.grad is not None and not finite_and_largest(p.grad)[0] for p in params):
        return "nonfinite_grad"
    return None


def unusable(params: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]], outputs: torch.Tensor) -> Optional[str]:
    """Why an adapted state cannot be predicted with, from its (parameter, source value or None) pairs and its
    outputs: "diverged" for non-finite weights or outputs, "exploded" for weights beyond explosion_limit of their
    source value; None when neither."""
    params = list(params)
    if any(not finite_and_largest(p.detach())[0] for p, _ in params) or not torch.isfinite(outputs).all():
        return "diverged"
    if any(p0 is not None and float(finite_and_largest(p.detach())[1]) > explosion_limit(p0) for p, p0 in params):
        return "exploded"
    return None


def collapsed_to_one_class(outputs: torch.Tensor, source_outputs: Optional[Callable[[], torch.Tensor]] = None) -> bool:
    """A batch of COLLAPSE_MIN_BATCH or more class-score rows all predicted as one class, where either their mean
    entropy is below 1e-3 (where entropy minimisation ends when it degenerates), or the source model, whose outputs
    on the same batch `source_outputs()` gives, gives no class more than half of the images (the batch holds several
    classes as far as the source can tell, so one class for all is the adaptation's doing). Smaller batches cannot
    tell a collapse from a batch of one class, and are never called collapsed."""
    if not (outputs.dim() == 2 and outputs.shape[0] >= COLLAPSE_MIN_BATCH and outputs.shape[1] >= 2):
        return False
    predicted = outputs.argmax(1)
    if not bool((predicted == predicted[0]).all()):
        return False
    probs = outputs.float().softmax(1)
    if float(-(probs * probs.clamp_min(1e-12).log()).sum(1).mean()) < 1e-3:
        return True
    if source_outputs is None:
        return False
    source = source_outputs().argmax(1)
    return int(torch.bincount(source).max()) <= source.shape[0] // 2


# ---- per-example copies: the same rules, image by image --------------------------------------------------------
def step_copies(optimizer: torch.optim.Optimizer, copies: Dict[str, torch.Tensor], losses: torch.Tensor,
                guard: bool, count: Count) -> None:
    """The optimizer step on stacked per-example copies (dim 0 is the image). With the guard on, an image whose loss
    or gradient is not finite keeps its parameters and optimizer state, as the guard of a batch-1 run skips that
    run's update (exactly so for SGD; Adam's step count is shared by the copies, so a skip shifts that image's bias
    correction)."""
    bad = torch.zeros_like(losses, dtype=torch.bool)
    if guard:
        bad_loss = ~torch.isfinite(losses)
        bad |= bad_loss
        for p in copies.values():
            if p.grad is not None:
                bad |= ~finite_and_largest(p.grad, per_slice=True)[0]
        count("nonfinite_loss", int(bad_loss.sum()))
        count("nonfinite_grad", int((bad & ~bad_loss).sum()))
    if not bad.any():  # the usual case (and always without the guard): a plain step
        optimizer.step()
        optimizer.zero_grad()
        return
    kept = {}
    for p in copies.values():
        state = {k: v[bad].clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim() > 0}
        kept[p] = (p.detach()[bad].clone(), state)
        if p.grad is not None:
            p.grad[bad] = 0  # so a NaN cannot reach the other images through shared optimizer arithmetic
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        for p, (value, state) in kept.items():
            p[bad] = value
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v) and v.dim() > 0:
                    # state made by this step (the first): a skipped image has none yet, which is zeros
                    v[bad] = state[k] if k in state else 0


def unusable_copies(copies: Dict[str, torch.Tensor], source: Dict[str, torch.Tensor], outputs: torch.Tensor,
                    count: Count) -> torch.Tensor:
    """Per image: non-finite weights or outputs, or weights that grew beyond explosion_limit (unusable's checks for
    a batch of one; a collapse needs a batch of COLLAPSE_MIN_BATCH or more)."""
    bad = ~finite_and_largest(outputs, per_slice=True)[0]
    exploded = torch.zeros_like(bad)
    for name, p in copies.items():
        finite, largest = finite_and_largest(p.detach(), per_slice=True)
        bad |= ~finite
        exploded |= largest > explosion_limit(source[name])
    count("diverged", int(bad.sum()))
    count("exploded", int((exploded & ~bad).sum()))
    return bad | exploded
