"""mergekit YAML configs read into Cairn merges: what maps, and what is refused by name."""

import pytest
import yaml

from cairn.errors import ConfigError
from cairn.methods.merge.mergekit import plan_from_mergekit, read_mergekit_config

TIES = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}],
    "parameters": {"normalize": False, "lambda": 0.8, "density": 0.5},
    "dtype": "bfloat16",
}


def test_a_ties_config_maps_to_cairns_merge():
    plan = plan_from_mergekit(TIES, "c.yml")
    assert (plan.base, plan.inputs, plan.weights, plan.dtype) == ("base", ["a", "b"], [1.0, 0.5], "BF16")
    assert (plan.opts.method, plan.opts.density, plan.opts.lambda_, plan.opts.normalize) == ("ties", 0.5, 0.8, False)


def test_linear_is_average_and_needs_no_base():
    plan = plan_from_mergekit({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 3}}]}, "c.yml")
    assert (plan.opts.method, plan.base, plan.weights, plan.dtype) == ("average", "a", [1.0, 3.0], None)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slices": []}, "key 'slices' is not supported"),
        ({"tokenizer_source": "base"}, "key 'tokenizer_source' is not supported"),
        ({"parameters": {"int8_mask": True}}, "parameters: key 'int8_mask' is not supported"),
        ({"merge_method": "multislerp"}, "merge_method 'multislerp' is not one Cairn implements"),
        ({"merge_method": "slerp", "parameters": {"t": 0.5}}, "models\\[0\\].parameters: weight does not apply to slerp, which reads no weights"),
        ({"merge_method": "model_stock", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1.0}}, "parameters: weight does not apply to model_stock"),
        ({"merge_method": "breadcrumbs", "models": [{"model": "a", "parameters": {"gamma": 0.01}}, {"model": "b", "parameters": {"gamma": 0.02}}]}, "different gammas"),
        ({"parameters": {"gamma": 0.01}}, "gamma does not apply to ties"),
        ({"merge_method": "slerp", "models": [{"model": "a"}], "parameters": {}}, "slerp needs t"),
        ({"models": [{"model": "base"}]}, "models: no model besides the base_model"),
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
        ({"base_model": None}, "base_model: expected the path"),
        ({"models": []}, "models: expected a non-empty list"),
        ({"models": [{"model": "a", "parameters": {"weight": [0.1, 0.9]}}]}, "models\\[0\\].parameters.weight: expected a finite number, got a list"),
        ({"models": [{"model": {"model": {"path": "a"}}}]}, "nested references are not supported"),
        ({"models": [{"model": "a", "parameters": {"density": 0.3}}, {"model": "b", "parameters": {"density": 0.6}}]}, "different densities"),
        ({"merge_method": "linear", "parameters": {"density": 0.5}}, "density does not apply to linear"),
        ({"parameters": {"lambda": "x"}}, "parameters: lambda"),
    ],
)
def test_what_cairn_does_not_support_is_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        plan_from_mergekit({**TIES, **change}, "c.yml")


def test_read_mergekit_config_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ties\nmodels: [\n")
    with pytest.raises(ConfigError, match="bad.yml:3"):
        read_mergekit_config(bad)
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump(TIES))
    assert read_mergekit_config(good).inputs == ["a", "b"]


def test_the_new_methods_map_with_their_parameters_and_the_listed_base_is_not_an_input():
    crumbs = {**TIES, "merge_method": "breadcrumbs_ties", "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.5}}], "parameters": {"density": 0.4, "gamma": 0.05, "lambda": 0.9}}
    plan = plan_from_mergekit(crumbs, "c.yml")
    assert (plan.opts.method, plan.opts.density, plan.opts.gamma, plan.opts.lambda_, plan.inputs) == ("breadcrumbs_ties", 0.4, 0.05, 0.9, ["a", "b"])
    assert plan_from_mergekit({**crumbs, "merge_method": "breadcrumbs", "parameters": {"density": 0.4}}, "c.yml").opts.gamma == 0.01  # mergekit's default
    stock = {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "base"}, {"model": "a"}, {"model": "b"}], "parameters": {"filter_wise": True}}
    plan = plan_from_mergekit(stock, "c.yml")
    assert (plan.opts.method, plan.opts.filter_wise, plan.inputs, plan.weights) == ("model_stock", True, ["a", "b"], [1.0, 1.0])
    slerp = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "a"}], "parameters": {"t": 0.3}}
    plan = plan_from_mergekit(slerp, "c.yml")
    assert (plan.opts.method, plan.opts.t, plan.base, plan.inputs) == ("slerp", 0.3, "base", ["a"])
