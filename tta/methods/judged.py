"""The base of the methods that hold a diffusion judge (diffusion_tta, diffusion_classifier): loading the judge from
a judge= argument or the config's `judge` field, a snapshot that leaves a frozen judge out, and a judge whose
denoiser adapts with the model (a config's `adapt_judge`, at its `judge_lr`). Not a method itself: nothing is
registered here."""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..adapter import Adapter
from ..config import make_config, with_new_names
from ..generative.base import denoiser_prefix, named_denoiser_parameters
from ..generative.loading import match_judge_to_model, resolve_judge


class JudgedAdapter(Adapter):
    """An Adapter with a diffusion judge under `judge_prefix`. The judge is a submodule (it moves with .to()), but
    only the parts of it that adapt are snapshotted and restored: a frozen DiT or SD judge is never copied, and an
    adapted one has its denoiser copied, not its VAE or text encoder.
    A config with `adapt_judge` true adapts the judge's denoiser (a DiffusionJudge's) with the model: its parameters
    are collected with judge_params() and get a parameter group of their own, at the config's `judge_lr` (None: lr).
    """
    judge_prefix = "judge."

    def __init__(self, model: nn.Module, cfg: Any = None, judge: Any = None, **overrides):
        # judge= was once backend= (tta.config.OLD_FIELD_NAMES): the old keyword, an object or a string, still works,
        # and giving both is refused
        overrides = with_new_names(self.Config, {**overrides, **({"judge": judge} if judge is not None else {})})
        config, judge = self.load_judge(model, cfg, overrides.pop("judge", None), overrides)
        super().__init__(model, config, modules={self.judge_prefix.rstrip("."): self.judge_module(judge, config)})

    @classmethod
    def judge_module(cls, judge: nn.Module, config: Any) -> nn.Module:
        """What the adapter holds under judge_prefix: the judge itself, or a module a method builds on it."""
        return judge

    # ---- a judge that adapts with the model ----------------------------------------------------------------------
    @property
    def judge(self) -> nn.Module:
        try:  # not getattr: the judge of diffusion_tta is the submodule `judge` itself
            return self._modules[self.judge_prefix.rstrip(".")]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} holds no judge yet") from None

    backend = judge  # deprecated alias, kept for existing code

    def judge_adapts(self) -> bool:
        return bool(getattr(self.cfg, "adapt_judge", False))

    def adapted_judge_prefixes(self) -> Tuple[str, ...]:
        """The parts of the judge the snapshot keeps: the denoiser, when it adapts."""
        return (f"{self.judge_prefix}{denoiser_prefix(self.judge)}.",) if self.judge_adapts() else ()

    def freeze_judge(self) -> None:
        """The judge in eval mode and frozen, but for its denoiser when it adapts."""
        self.judge.eval().requires_grad_(False)
        for _, p in self.judge_params():
            p.requires_grad_(True)

    def judge_params(self) -> List[Tuple[str, nn.Parameter]]:
        """(name, parameter) of the judge's denoiser when it adapts, else none."""
        judge = named_denoiser_parameters(self.judge) if self.judge_adapts() else []
        return [(f"{self.judge_prefix}{n}", p) for n, p in judge]

    def build_optimizer(self, params: List[nn.Parameter]) -> torch.optim.Optimizer:
        """The judge's parameters, when some adapt, are a parameter group of their own, at judge_lr."""
        judge = {id(p) for p in self.judge.parameters()}
        lr = getattr(self.cfg, "judge_lr", None)
        groups = [{"params": [p for p in params if id(p) not in judge]},
                  {"params": [p for p in params if id(p) in judge], "lr": lr if lr is not None else self.cfg.lr}]
        return super().build_optimizer([g for g in groups if g["params"]])

    @classmethod
    def load_judge(cls, model: nn.Module, cfg: Any, judge: Any, overrides: Dict[str, Any]):
        """(config, judge): the judge from a judge= object, a judge= string or the config's `judge` field,
        checked against the model; the config records where the judge came from, so result rows say it."""
        config = make_config(cls.Config, cfg, overrides)
        if isinstance(judge, (str, os.PathLike)):  # a string is the config field; an object is used as it is
            config, judge = dataclasses.replace(config, judge=os.fspath(judge)), None
        judge = resolve_judge(judge, config.judge, cls.name, device=device_of(model))
        if config.judge is None:
            config = dataclasses.replace(config, judge=judge.source)
        match_judge_to_model(model, judge, cls.name)
        return config, judge

    def _capture_state(self) -> Dict[str, Any]:
        keep = self.adapted_judge_prefixes()
        module_state = {k: v.detach().clone() for k, v in self.state_dict().items()
                        if not k.startswith(self.judge_prefix) or k.startswith(keep)}
        optim_state = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None
        return {"module": module_state, "optimizer": optim_state}

    def restore_source_modules(self) -> None:
        """The snapshot leaves out the judge's frozen weights (they never change): load it non-strictly, and
        refuse anything else missing or unexpected."""
        missing, unexpected = self.load_state_dict(self.source_state_dict, strict=False)
        missing = [k for k in missing if not k.startswith(self.judge_prefix)]
        if missing or unexpected:
            raise RuntimeError(f"reset() found a changed module structure: missing {missing}, unexpected {unexpected}")


def device_of(model: nn.Module) -> Optional[torch.device]:
    p = next(model.parameters(), None)
    return p.device if p is not None else None
