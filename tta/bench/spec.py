"""Benchmark files: one YAML file per benchmark in benchmarks/, read into dataclasses. Unknown keys are errors
at every level, so a typo never silently runs the wrong experiment.

    name: imagenet-c
    description: ...
    model: {name: tv:resnet50@IMAGENET1K_V1}          # or {factory: pkg.module:fn, weights: ckpt.pt, ...}
    data: {kind: imagenet-c, root: ~/data/ImageNet-C, corruptions: standard, severities: [5], per_class: 5}
    settings: [continual, reset_per_shift]
    seeds: [0]
    batch_size: 64
    methods:
      - name: source
      - {name: tent, config: {lr: 2.5e-4}}
      - {name: memo, label: memo-episodic, batch_size: 1, settings: [episodic]}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..data.streams import check_setting
from .datasets import DataConfig, parse_data_config
from .fields import expand_path, strict_dataclass
from .factories import check_factory, resolve_factory


@dataclass
class ModelSpec:
    """A `tta.create_model` spec (`name`), or a Python factory returning an nn.Module that is wrapped with
    `mean`, `std`, `input_size` and `class_names` (for networks of your own, e.g. a CIFAR WideResNet). A factory
    that returns a tta model already (an ImageModel from tta.wrap_model, or an IT3Net around one) is used as is."""
    name: Optional[str] = None
    factory: Optional[str] = None            # "package.module:function"
    weights: Optional[str] = None            # a local checkpoint (never a download)
    pretrained: bool = True
    kwargs: Dict[str, Any] = field(default_factory=dict)
    class_names: Union[None, str, List[str]] = None  # "data": each domain's own classes (zero-shot heads)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    input_size: Optional[List[int]] = None
    task: Optional[str] = None

    def __post_init__(self):
        if (self.name is None) == (self.factory is None):
            raise ValueError("model needs exactly one of `name` (a tta.create_model spec such as timm:resnet50) or "
                             "`factory` (package.module:function returning an nn.Module)")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"model.factory must look like package.module:function, got {self.factory!r}")
        if self.class_names == "data" and self.input_size is None:
            raise ValueError("model.class_names: data builds one model per domain, so the data must be read "
                             "before any model exists: give model.input_size, e.g. [3, 224, 224]")
        if isinstance(self.class_names, str) and self.class_names != "data":
            raise ValueError(f"model.class_names must be a list, 'data' or absent, got {self.class_names!r}")

    @property
    def per_domain(self) -> bool:
        return self.class_names == "data"

    @property
    def label(self) -> str:
        return self.name or self.factory

    def build(self, class_names: Optional[List[str]] = None, templates=None, allow_code: bool = False):
        """The wrapped model; `class_names` / `templates` come from the domain when class_names is 'data'.
        A `factory` outside the packages of tta.bench.factories is refused unless `allow_code`."""
        from ..models import ImageModel, create_model, wrap_model
        from ..models.weights import load_weights
        from ..nets import IT3Net
        names = class_names if self.per_domain else self.class_names
        kwargs = dict(self.kwargs)
        if self.name is not None:
            if names is not None:
                kwargs["class_names"] = names
            if templates is not None and self.name.startswith("clip:"):
                kwargs["templates"] = tuple(templates)
            if self.task is not None:
                kwargs["task"] = self.task
            for key in ("mean", "std"):
                if getattr(self, key) is not None:
                    raise ValueError(f"model.{key} applies to factory models; {self.name} brings its own normalisation")
            if self.input_size is not None and self.name.startswith("smp:"):
                kwargs["input_size"] = tuple(self.input_size)
            model = create_model(self.name, pretrained=self.pretrained, weights=self._weights(), **kwargs)
            if self.input_size is not None:  # evaluate at another resolution (convolutional networks allow it)
                model.input_size = tuple(self.input_size)
            return model
        net = resolve_factory(self.factory, allow_code)(**kwargs)
        if self.weights is not None:
            load_weights(net, self._weights())
        if isinstance(net, (ImageModel, IT3Net)):
            return self._ready_made(net)
        extra = {k: v for k, v in (("mean", self.mean), ("std", self.std)) if v is not None}
        return wrap_model(net, class_names=names, input_size=tuple(self.input_size or (3, 224, 224)),
                          task=self.task or "classification", name=self.factory, **extra)

    def _ready_made(self, model):
        """A factory's tta model, not wrapped again: an ImageModel inside another would hide an IT3Net from the
        it3 method (which needs f(x, y)) and normalise the images twice."""
        kind = type(model).__name__
        for key in ("mean", "std", "class_names", "task"):
            if getattr(self, key) is not None:
                raise ValueError(f"model.{key} applies to a bare network, but {self.factory} returns a ready-made "
                                 f"{kind}, which brings its own; remove model.{key} from the benchmark file, or set "
                                 "it in the factory where it wraps the network (tta.wrap_model)")
        if model.input_size is None:  # an IT3Net around a bare network: nothing says how to size or normalise
            raise ValueError(f"{self.factory} returns an IT3Net around a bare {type(model.net).__name__}, so nothing "
                             "says how to size and normalise its images; build it as IT3Net(tta.wrap_model(net, "
                             "mean=..., std=..., class_names=..., input_size=...), num_outputs=K, "
                             "layer='net.<module name>')")
        if self.input_size is not None:  # evaluate at another resolution, as for named models
            model.input_size = tuple(self.input_size)
        return model

    def _weights(self) -> Optional[Path]:
        return expand_path(self.weights, "model.weights", "or edit model.weights") if self.weights else None


@dataclass
class MethodSpec:
    """One method run: the adapter `name`, its config overrides, and optionally its own batch size / settings."""
    name: str
    label: Optional[str] = None
    config: Dict[str, Any] = field(default_factory=dict)
    batch_size: Optional[int] = None
    settings: Optional[List[str]] = None
    model: Optional[ModelSpec] = None      # the method's own model, when it needs one (it3, slow_inference)
    limit: Optional[int] = None            # at most this many images per domain (slow per-example methods)
    # also store each image's prediction after 0, 1, ..., steps updates (methods with Adapter.records_steps): one
    # run at N steps then shows every step count up to N; it observes the run and changes none of its results
    record_steps: bool = False

    def __post_init__(self):
        self.label = self.label or self.name
        if isinstance(self.model, dict):
            self.model = strict_dataclass(ModelSpec, self.model, f"method {self.label}: model")
            if self.model.per_domain:
                raise ValueError(f"method {self.label}: a method's own model cannot take class_names: data")
        for s in self.settings or []:
            check_setting(s)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"method {self.label}: limit must be a positive integer, got {self.limit!r}")
        if not isinstance(self.record_steps, bool):
            raise ValueError(f"method {self.label}: record_steps must be true or false, got {self.record_steps!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"method {self.label}: batch_size must be a positive integer, got {self.batch_size!r}")

    def resolved_config(self):
        """The method's full config dataclass (defaults + overrides), checked without building a model."""
        from ..adapter import ADAPTERS, make_config
        cls = ADAPTERS.get(self.name)
        try:
            return make_config(cls.Config, None, self.config)
        except TypeError as err:
            raise ValueError(f"method {self.label}: {err}") from err


@dataclass
class BenchmarkSpec:
    name: str
    model: ModelSpec
    data: DataConfig
    methods: List[MethodSpec]
    description: str = ""
    settings: List[str] = field(default_factory=lambda: ["continual"])
    seeds: List[int] = field(default_factory=lambda: [0])
    batch_size: int = 64
    shuffle: bool = True              # seeded permutation within each domain
    num_workers: int = 0
    mce_baseline: Optional[str] = None   # "alexnet": normalise mCE by AlexNet's errors (ImageNet-C)
    source_file: Optional[str] = None

    def __post_init__(self):
        for s in self.settings:
            check_setting(s)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 (load in the main process) or more, got {self.num_workers!r}")
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"method label(s) {dup} appear twice; give each run of a method its own `label`")
        if not self.methods:
            raise ValueError("a benchmark needs at least one method")
        if self.mce_baseline is not None:
            from .metrics import MCE_BASELINES
            if self.mce_baseline not in MCE_BASELINES:
                raise ValueError(f"mce_baseline must be one of {', '.join(MCE_BASELINES)} or absent")

    def check_factories(self, methods: List[MethodSpec], allow_code: bool = False) -> None:
        """Refuse a disallowed `factory` (the benchmark's or a method's own) before any model is built."""
        models = [("model.factory", self.model)] + [(f"method {m.label}: model.factory", m.model) for m in methods]
        for where, model in models:
            if model is not None and model.factory is not None:
                check_factory(model.factory, allow_code, f"{self.source_file or self.name}: {where}")

    def select(self, labels: Optional[List[str]]) -> List[MethodSpec]:
        if not labels:
            return list(self.methods)
        known = {m.label: m for m in self.methods}
        missing = [x for x in labels if x not in known]
        if missing:
            raise ValueError(f"--methods {missing} not in {self.source_file or self.name}; its methods are "
                             f"{', '.join(known)}")
        return [known[x] for x in labels]


def parse_spec(values: Dict[str, Any], source_file: Optional[str] = None) -> BenchmarkSpec:
    where = source_file or "benchmark"
    if not isinstance(values, dict):
        raise ValueError(f"{where}: a benchmark file holds a mapping at the top level")
    values = dict(values)
    for key in ("name", "model", "data", "methods"):
        if key not in values:
            raise ValueError(f"{where}: missing required key {key!r}")
    values["model"] = strict_dataclass(ModelSpec, values["model"], f"{where}: model")
    values["data"] = parse_data_config(values["data"]) if isinstance(values["data"], dict) else \
        strict_dataclass(DataConfig, values["data"], f"{where}: data")
    if not isinstance(values["methods"], list):
        raise ValueError(f"{where}: methods must be a list")
    values["methods"] = [strict_dataclass(MethodSpec, {"name": m} if isinstance(m, str) else m,
                                          f"{where}: methods[{i}]") for i, m in enumerate(values["methods"])]
    values["source_file"] = source_file
    return strict_dataclass(BenchmarkSpec, values, where)


PACKAGED_SPECS = Path(__file__).parent / "specs"


def load_spec(path) -> BenchmarkSpec:
    """A benchmark YAML file, or the name of one shipped inside the package (`quick`)."""
    path = Path(path)
    if not path.is_file() and (PACKAGED_SPECS / f"{path}.yaml").is_file():
        path = PACKAGED_SPECS / f"{path}.yaml"
    if not path.is_file():
        shipped = ", ".join(p.stem for p in sorted(PACKAGED_SPECS.glob("*.yaml")))
        raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist; pass a YAML file (see benchmarks/) "
                                f"or the name of a packaged benchmark: {shipped}")
    return parse_spec(read_yaml(path), str(path))


def read_yaml(path: Path) -> Any:
    """The YAML data of a benchmark file. Only plain data is read (SafeLoader): a tag that would build a Python
    object is refused, never run. Every failure names the file and line and says what to fix."""
    import yaml
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: byte 0x{data[err.start]:02x} is not UTF-8 text; save the file as "
                         "UTF-8") from err
    try:
        return yaml.load(text, Loader=_unique_keys_loader(yaml, str(path)))
    except yaml.constructor.ConstructorError as err:
        problem = str(err.problem or "")
        if "could not determine a constructor for the tag" in problem:
            mark = err.problem_mark
            where = f"{path}: line {mark.line + 1}" if mark else str(path)
            tag = problem.rsplit("tag ", 1)[-1].strip("'").replace("tag:yaml.org,2002:", "!!")
            what = "would build a Python object" if "python/" in tag else "is not plain YAML data"
            raise ValueError(f"{where}: the tag {tag} {what}; benchmark files hold plain data only and such tags "
                             "are never run: remove the tag") from None
        raise _yaml_syntax_error(path, err) from None
    except yaml.MarkedYAMLError as err:
        raise _yaml_syntax_error(path, err) from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err}); fix the file") from None


def _yaml_syntax_error(path: Path, err) -> ValueError:
    mark = err.problem_mark or err.context_mark
    where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    what = " ".join(x for x in (err.context, err.problem) if x)
    return ValueError(f"{where}: not valid YAML ({what}); fix the file (a missing bracket, quote or colon, or a tab "
                      "used for indentation?)")


def _unique_keys_loader(yaml, where: str):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML would keep the last silently).
    Merge keys (`<<: *common`) work as in YAML: keys written in the mapping override the merged ones."""
    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    merge_tag = "tag:yaml.org,2002:merge"

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == merge_tag:  # resolved by construct_mapping; it has no constructor of its own
                continue
            key = loader.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: construct_mapping reports it
                continue
            if duplicate:
                raise ValueError(f"{where}: line {key_node.start_mark.line + 1}: key {key!r} appears twice in the "
                                 "same mapping; keep one")
        return loader.construct_mapping(node, deep)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return UniqueKeyLoader
