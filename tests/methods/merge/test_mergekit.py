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
        ({"merge_method": "slerp"}, "merge_method 'slerp' is not one Cairn implements"),
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
