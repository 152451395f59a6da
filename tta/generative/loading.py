"""create_judge: a diffusion judge from "<kind>:<hub id or folder>", a bare folder (kind detected) or an object."""
from __future__ import annotations

import os
from typing import Any, List, Optional, Union

import torch

from ..models.hub import download_errors, require_hf_repo
from ..registry import Registry
from .base import JUDGES, DiffusionJudge, is_local, read_json_file, read_metadata

PIPELINE_KINDS = {"DiTPipeline": "dit", "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd"}
KIND_FILES = "tta_backend.json, model_index.json, unet/config.json or config.json"
EXAMPLES = ("pixel-unet:/path/to/fmnist_judge, dit:facebook/DiT-XL-2-256, sd:stabilityai/stable-diffusion-2-base, "
            "map-unet:/path/to/seg_judge")

# Named judges: "<source>:<name>" -> the judge's folder (or another spec), for judges that ship with a package rather
# than live at a path the user knows. The zoo registers "zoo" (tta/zoo/registry.py); this package never imports the
# zoo (the zoo sits above it and imports it to train and check its judges). `import tta` imports the zoo, and any
# import of tta.generative runs tta/__init__.py first, so "zoo" is registered before a judge can be loaded.
JUDGE_SOURCES = Registry("judge source")


def _read_json(file: str) -> dict:
    return read_json_file(file, "a diffusion judge's configuration")


def _unet_kind(config: dict) -> Optional[str]:
    """A UNet2DModel is a pixel-unet judge with a class table, a map-unet judge with extra input channels."""
    if config.get("num_class_embeds"):
        return "pixel-unet"
    if config.get("in_channels", 0) > (config.get("out_channels") or 0):
        return "map-unet"
    return None


def detect_kind(path: str) -> str:
    """The judge kind of a folder or hub repository, from tta_backend.json, model_index.json or the UNet config."""
    meta = read_metadata(path)
    if "kind" in meta:
        return meta["kind"]
    local = os.path.expanduser(path)
    if is_local(path):
        if not os.path.isdir(local):
            raise FileNotFoundError(f"no diffusion judge folder at {path!r}; pass an existing folder written with "
                                    f"save_pretrained, or a hub id with its kind, e.g. {EXAMPLES}")
        index_file = os.path.join(local, "model_index.json")
        index = _read_json(index_file) if os.path.isfile(index_file) else None
    else:
        try:
            from diffusers import DiffusionPipeline
            index = DiffusionPipeline.load_config(path)
        except (OSError, ValueError) as e:
            raise OSError(f"could not read model_index.json of {path!r} to tell which kind of diffusion model it is "
                          f"({e}); name the kind, e.g. {EXAMPLES}") from e
    if index is not None:
        name = index.get("_class_name", "")
        if name in PIPELINE_KINDS:
            return PIPELINE_KINDS[name]
        if "unet" in index and is_local(path) and os.path.isfile(os.path.join(local, "unet", "config.json")):
            kind = _unet_kind(_read_json(os.path.join(local, "unet", "config.json")))
            if kind:
                return kind
    if is_local(path):
        for config_file in (os.path.join(local, "unet", "config.json"), os.path.join(local, "config.json")):
            if os.path.isfile(config_file):
                config = _read_json(config_file)
                if config.get("_class_name") == "UNet2DModel" and _unet_kind(config):
                    return _unet_kind(config)
    # The message names what was looked for, never what the folder holds: the path comes from the user (or from a
    # benchmark file), and listing an arbitrary folder such as /etc would leak its contents into logs.
    what = (f"no file in the folder names a judge kind tta knows (it reads {KIND_FILES})" if is_local(path)
            else f"the model_index.json of hub repository {path!r} names no pipeline tta knows")
    raise ValueError(f"cannot tell which kind of diffusion judge {path!r} is: {what}; pass a judge folder written "
                     f"with save_pretrained, or name the kind as '<kind>:<path>' with kind in {JUDGES.names()}, "
                     f"e.g. {EXAMPLES}, or add a tta_backend.json with {{\"kind\": ...}} to the folder")


def create_judge(name_or_path: Union[str, os.PathLike, DiffusionJudge], kind: Optional[str] = None,
                 device: Optional[Union[str, torch.device]] = None, **kwargs: Any) -> DiffusionJudge:
    """Load a diffusion judge through diffusers' from_pretrained.

    `name_or_path` is "<kind>:<hub id or folder>" (kind in list_judges()), a named judge "<source>:<name>"
    (source in JUDGE_SOURCES, e.g. "zoo:fmnist-judge", see tta zoo list), or a local folder whose kind is read
    from its files; keyword arguments go to the judge's from_pretrained
    (class_names, prompt, torch_dtype, map_kind, map_range, ...). A DiffusionJudge object is returned as it is.
    """
    if isinstance(name_or_path, DiffusionJudge):
        return name_or_path.to(device) if device is not None else name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"a judge is a '<kind>:<hub id or folder>' string, a folder or a DiffusionJudge; "
                        f"got {type(name_or_path).__name__}")
    spec = os.fspath(name_or_path)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix not in JUDGES and prefix in JUDGE_SOURCES:  # e.g. zoo:fmnist-judge, wherever installed
        spec = os.fspath(JUDGE_SOURCES.get(prefix)(rest))
        prefix, sep, rest = spec.partition(":")
    if sep and prefix in JUDGES:
        if kind is not None and kind != prefix:
            raise ValueError(f"kind={kind!r} contradicts the prefix of {spec!r}")
        kind, spec = prefix, rest
    elif sep and len(prefix) > 1 and not is_local(spec):
        # A hub id never holds ':' (and 'C:' is a Windows drive), so this is a kind tta does not know: say so
        # rather than ask the hub for a repository that cannot exist.
        raise ValueError(f"unknown diffusion judge kind {prefix!r} in {spec!r}; valid kinds: "
                         f"{', '.join(JUDGES.names())}, or a named judge "
                         f"{' / '.join(f'{s}:<name>' for s in JUDGE_SOURCES.names())}; e.g. {EXAMPLES}")
    if not spec:
        raise ValueError(f"empty judge path; pass e.g. {EXAMPLES}")
    what = f"the diffusion judge {spec}"
    if not is_local(spec):  # a hub id: fail at once, naming the network, when it is not cached and cannot be fetched
        require_hf_repo(spec, what)
    with download_errors(what):
        kind = kind or detect_kind(spec)
        judge = JUDGES.get(kind).from_pretrained(spec, **kwargs)
    judge.source = f"{kind}:{spec}"
    return judge.to(device) if device is not None else judge


def list_judges(pattern: str = "*") -> List[str]:
    return JUDGES.names(pattern)


def resolve_judge(judge: Any, config_value: Optional[str], method: str,
                  device: Optional[torch.device] = None) -> DiffusionJudge:
    """The judge a method was given: a DiffusionJudge object, or a spec string (argument or config field)."""
    spec = judge if judge is not None else config_value
    if spec is None:
        raise ValueError(f"{method} needs a diffusion judge: pass judge=<DiffusionJudge> or "
                         f"judge='<kind>:<hub id or folder>' (e.g. {EXAMPLES}); on the command line "
                         f"--set judge=<kind>:<path>")
    return create_judge(spec, device=device)


def model_task(model) -> Optional[str]:
    return getattr(model, "task", None)


def condition_weights(model, judge: DiffusionJudge, outputs: torch.Tensor, method: str) -> torch.Tensor:
    """What the judge is conditioned on, from the model's outputs: soft class weights (softmax over dim 1) for
    classifiers and segmenters, the map itself for depth."""
    task = model_task(model) or ("classification" if outputs.dim() == 2 else
                                 "depth" if outputs.shape[1] == 1 else "segmentation")
    if task == "depth":
        return outputs.unsqueeze(1) if outputs.dim() == 3 else outputs
    k = judge.map_channels if judge.conditioning == "map" else judge.num_classes
    if outputs.dim() < 2 or outputs.shape[1] != k:
        raise ValueError(f"{method}: the model's output {tuple(outputs.shape)} does not give the {k} "
                         f"class scores the {judge.kind} judge is conditioned on")
    return outputs.softmax(1)


def match_judge_to_model(model, judge: DiffusionJudge, method: str) -> None:
    """Refuse judge/model pairs that cannot work together, with what to pass instead; give text judges the
    model's class names (a CLIP zero-shot model's classes become the judge's prompts)."""
    task = model_task(model) or "classification"
    names = getattr(model, "class_names", None)
    if task == "classification":
        if judge.conditioning == "map":
            raise ValueError(f"{method}: a map-conditioned judge serves segmentation and depth models; for a "
                             "classifier use a class-conditional (pixel-unet, dit) or text-conditioned (sd) judge")
        if judge.conditioning == "text":
            if names is not None:
                if judge.class_names != list(names):
                    judge.set_class_names(list(names))
            elif judge.class_names is None:
                raise ValueError(f"{method}: the text-conditioned judge needs class names; wrap the model with "
                                 "class_names (tta.wrap_model(net, class_names=...)) or pass class_names= to "
                                 "create_judge")
        elif names is not None and len(names) != judge.num_classes:
            raise ValueError(f"{method}: the model predicts {len(names)} classes but the {judge.kind} judge "
                             f"knows {judge.num_classes}; use a judge trained on the model's classes (or a "
                             "text-conditioned sd judge, which takes any class names)")
        return
    if judge.conditioning != "map":
        raise ValueError(f"{method}: a {task} model needs a map-conditioned judge (kind 'map-unet'), got a "
                         f"{judge.conditioning}-conditioned {judge.kind!r} judge")
    if task == "depth" and judge.map_channels != 1:
        raise ValueError(f"{method}: a depth model needs a judge conditioned on a 1-channel map; this judge "
                         f"takes {judge.map_channels} channels")
    if task == "segmentation" and names is not None and len(names) != judge.map_channels:
        raise ValueError(f"{method}: the segmenter predicts {len(names)} classes but the judge takes "
                         f"{judge.map_channels}-channel probability maps")

# deprecated aliases, kept for existing code
create_backend = create_judge
list_backends = list_judges
resolve_backend = resolve_judge
match_backend_to_model = match_judge_to_model
