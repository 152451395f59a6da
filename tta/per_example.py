"""Episodic adaptation of every example of a batch on its own copy of the adapted parameters, all at once.

The copies are stacked along a new first dimension and the network runs once per copy through torch.func (vmap
over functional_call); a method's step function sees the whole batch. Each example's loss depends only on its own
copy, and SGD and Adam update element by element, so this is B independent episodic runs of batch 1 done at once
(the same result, fewer and larger calls of whatever scores the outputs). The module's own parameters never change.
The divergence guard applies image by image (tta.guard.step_copies, tta.guard.unusable_copies).
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from .guard import step_copies, unusable_copies

if TYPE_CHECKING:
    from .adapter import Adapter

Predict = Callable[[torch.Tensor], torch.Tensor]  # a batch of examples -> the outputs of their own copies


def adapt_per_example(adapter: "Adapter", x: torch.Tensor, step: Callable[[Predict], torch.Tensor],
                      owner: nn.Module, predict_source: Predict, lead: Tuple[Any, ...] = (),
                      call_kwargs: Optional[Dict[str, Any]] = None) -> torch.Tensor:
    """Run adapter.cfg.steps steps on per-example copies of `owner`'s trainable parameters and return each example's
    prediction from its adapted copy. `step(predict)` accumulates the gradients of one step (a sum over examples of
    each example's loss, so that every copy gets the gradient it would get alone) and returns the per-example losses.
    The copies' outputs are `owner(*lead, example, **call_kwargs)`; with the guard on, an example whose copy diverged
    gets `predict_source` of it instead, as a batch-1 run's guard would give."""
    b = x.shape[0]
    named = dict(owner.named_parameters())
    copies = {n: p.detach().unsqueeze(0).repeat(b, *([1] * p.dim())).requires_grad_(True)
              for n, p in named.items() if p.requires_grad}
    fixed = {**{n: p.detach() for n, p in named.items() if n not in copies}, **dict(owner.named_buffers())}
    optimizer = adapter.build_optimizer(list(copies.values()))

    def one(params, example):
        return functional_call(owner, {**fixed, **params}, (*lead, example.unsqueeze(0)), call_kwargs or {}).squeeze(0)

    def predict(examples: torch.Tensor) -> torch.Tensor:
        try:
            with attention_without_fast_path():
                return vmap(one)(copies, examples)
        except RuntimeError as e:  # vmap cannot batch every operation (in-place updates, data-dependent code)
            raise RuntimeError(f"per_example=True could not run this model under torch.func.vmap ({e}); "
                               "use per_example=False and batches of one image") from e

    with torch.enable_grad():
        for _ in range(adapter.cfg.steps):
            losses = step(predict)
            step_copies(optimizer, copies, losses, adapter.cfg.guard, adapter.count_guard_event)
    with torch.no_grad():
        outputs = predict(x)
        if adapter.cfg.guard:
            bad = unusable_copies(copies, named, outputs, adapter.count_guard_event)
            if bad.any():
                outputs[bad] = predict_source(x[bad]).to(outputs.dtype)
        return outputs


@contextlib.contextmanager
def attention_without_fast_path() -> Iterator[None]:
    """nn.MultiheadAttention on its regular path inside the block, and as it was before on exit (also on error).

    Under vmap nn.MultiheadAttention cannot tell that its weights need gradients and takes its inference fast path,
    which has no backward. torch offers only a process-wide switch for that path, so it is turned off for the block
    alone and put back."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
