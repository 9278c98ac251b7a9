"""mergekit's YAML merge configs, read into a Cairn merge (`cairn merge --config FILE.yml`).

Supported, with mergekit's meaning:

    merge_method: ties            # linear (Cairn's average), task_arithmetic, ties, dare_linear, dare_ties,
                                  # breadcrumbs, breadcrumbs_ties, model_stock, slerp, della, della_linear,
                                  # sce, karcher, nuslerp
    base_model: PATH              # optional for linear and karcher (the first model then gives the layout)
    models:
      - model: PATH               # a HF folder or PEFT adapter folder (the base_model, listed, is
        parameters: {weight: 1.0, density: 0.5, gamma: 0.01, epsilon: 0.15}   # not an input, as in mergekit,
    parameters: {normalize: true, lambda: 1.0, weight: ..., density: ..., gamma: ..., epsilon: ...,   # but for karcher)
                 t: 0.5, filter_wise: false, select_topk: 1.0, max_iter: 10, tol: 1e-5,
                 nuslerp_row_wise: false, nuslerp_flatten: true}
    dtype: bfloat16               # float32 | bfloat16 | float16: the output's floating dtype

`model_stock`, `slerp`, `sce` and `karcher` read no weights (a weight given is refused); `slerp`
needs `t`. `karcher` averages every model it is given, the base_model included (listed or not, as
mergekit's planner adds it). `nuslerp` needs a base_model (Cairn interpolates task vectors; mergekit's
nuslerp of two models without one is not supported).

Anything else is refused by name: per-layer `slices`, tokenizer and chat-template options,
gradient (list) parameter values, per-model densities, gammas or epsilons that differ (Cairn keeps
one of each per merge), mergekit-only parameters such as `int8_mask` or `rescale`, and nested model references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from cairn.errors import ConfigError
from cairn.io import read_yaml
from cairn.options import MERGE_METHODS, MergeOptions
from cairn.validation import config_error

METHODS = {"linear": "average", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
           "breadcrumbs": "breadcrumbs", "breadcrumbs_ties": "breadcrumbs_ties", "model_stock": "model_stock", "slerp": "slerp",
           "della": "della", "della_linear": "della_linear", "sce": "sce", "karcher": "karcher", "nuslerp": "nuslerp"}  # fmt: skip
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype")
SHARED = ("normalize", "lambda", "t", "filter_wise", "select_topk", "max_iter", "tol", "nuslerp_row_wise", "nuslerp_flatten")  # one per merge
PER_MODEL = ("density", "gamma", "epsilon")  # per model in mergekit; one per merge in Cairn
GLOBAL_PARAMETERS = ("weight", *PER_MODEL, *SHARED)
MODEL_PARAMETERS = ("weight", *PER_MODEL)
UNWEIGHTED = ("model_stock", "slerp", "sce", "karcher")  # mergekit's methods that read no weight
WITH_THE_BASE = ("karcher",)  # mergekit's methods whose inputs include the base_model


@dataclass(frozen=True)
class MergePlan:
    """What a mergekit config asks for, in Cairn's terms."""

    base: str
    inputs: list[str]
    weights: list[float]
    opts: MergeOptions
    dtype: str | None  # safetensors dtype name of the output's floats; None: the base's


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        kind = "a list (a gradient over layers)" if isinstance(value, list) else repr(value)
        raise ConfigError(f"{where}: expected a finite number, got {kind}; Cairn supports one value per model and merge")
    return float(value)


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _refuse_unknown(data: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{where}: key {key!r} is not supported by Cairn's merge (supported: {', '.join(allowed)})")


def plan_from_mergekit(data, where: str) -> MergePlan:
    """The Cairn merge a parsed mergekit config describes; ConfigError naming the key otherwise."""
    data = _mapping(data, where)
    _refuse_unknown(data, TOP_LEVEL, where)
    method = data.get("merge_method")
    if method not in METHODS:
        raise ConfigError(f"{where}: merge_method {method!r} is not one Cairn implements (supported: {', '.join(METHODS)})")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: models: expected a non-empty list of {{model: PATH, parameters: {{...}}}}")
    defaults = _mapping(data.get("parameters"), f"{where}: parameters")
    _refuse_unknown(defaults, GLOBAL_PARAMETERS, f"{where}: parameters")
    if "weight" in defaults and method in UNWEIGHTED:
        raise ConfigError(f"{where}: parameters: weight does not apply to {method}, which reads no weights")
    base = data.get("base_model")
    inputs, weights, per_model = [], [], {key: set() for key in PER_MODEL}
    for i, entry in enumerate(models):
        at = f"{where}: models[{i}]"
        entry = _mapping(entry, at)
        _refuse_unknown(entry, ("model", "parameters"), at)
        if not isinstance(entry.get("model"), str) or not entry["model"]:
            raise ConfigError(f"{at}.model: expected a path to a model or adapter folder, got {entry.get('model')!r} (nested references are not supported)")
        params = _mapping(entry.get("parameters"), f"{at}.parameters")
        _refuse_unknown(params, MODEL_PARAMETERS, f"{at}.parameters")
        if "weight" in params and method in UNWEIGHTED:
            raise ConfigError(f"{at}.parameters: weight does not apply to {method}, which reads no weights")
        if method != "linear" and method not in WITH_THE_BASE and entry["model"] == base:  # mergekit's task vectors (and slerp's ends) skip the base
            continue
        inputs.append(entry["model"])
        weights.append(_number(params.get("weight", defaults.get("weight", 1.0)), f"{at}.parameters.weight"))
        for key, seen in per_model.items():
            if key in params or key in defaults:
                seen.add(_number(params.get(key, defaults.get(key)), f"{at}.parameters.{key}"))
    for key, seen in per_model.items():
        if len(seen) > 1:
            plural = {"density": "densities", "gamma": "gammas", "epsilon": "epsilons"}[key]
            raise ConfigError(f"{where}: models have different {plural} {sorted(seen)}; Cairn's merge keeps one {key} for all models")
    if method in WITH_THE_BASE and isinstance(base, str) and base not in inputs:
        inputs.append(base)  # mergekit's planner adds the base_model after the listed models
        weights.append(1.0)
    if not inputs:
        raise ConfigError(f"{where}: models: no model besides the base_model")
    base = base or (inputs[0] if method in ("linear", *WITH_THE_BASE) else None)
    if method == "nuslerp" and base is None:
        raise ConfigError(f"{where}: base_model: Cairn's nuslerp interpolates the two models' task vectors from a base_model; give one "
                          "(mergekit's nuslerp of the two models themselves, without a base_model, is not supported)")
    if not isinstance(base, str):
        raise ConfigError(f"{where}: base_model: expected the path of the model every input was fine-tuned from ({method} needs it)")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"{where}: dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    options = {"method": METHODS[method], **{key: seen.pop() for key, seen in per_model.items() if seen}}
    for key in SHARED:
        if key in defaults:
            options[key] = defaults[key]
    for key in (*PER_MODEL, *SHARED):
        if key == "normalize":  # MergeOptions refuses it where the method has none
            continue
        if key in options and key not in MERGE_METHODS[options["method"]].reads:
            raise ConfigError(f"{where}: {key} does not apply to {method}")
    try:
        opts = MergeOptions(**options)
    except ValidationError as exc:
        raise config_error(exc, f"{where}: parameters") from None
    return MergePlan(base, inputs, weights, opts, DTYPES.get(dtype))


def read_mergekit_config(path: str | Path) -> MergePlan:
    """Read a mergekit YAML file; relative model paths are taken from the current folder, as mergekit does."""
    return plan_from_mergekit(read_yaml(path), str(path))
