"""The model card every contribution carries, written from its manifest."""

import yaml

from cairn.model_card import model_card
from cairn.options import TrainConfig


def manifest(**fields) -> dict:
    return {"kind": "model", "task": "people", "method": "fft", "base": "HuggingFaceTB/SmolLM2-135M", "base_fingerprint": "ab" * 32, "metric": "exact",
            "data_hash": "cd" * 32, "hyperparameters": TrainConfig(method="fft").model_dump(), **fields}  # fmt: skip


def test_a_card_on_a_hub_base_names_it_in_the_hub_metadata_and_a_local_base_does_not():
    header = yaml.safe_load(model_card(manifest()).split("---\n")[1])
    assert header == {"library_name": "transformers", "base_model": "HuggingFaceTB/SmolLM2-135M", "tags": ["cairn", "fft"]}
    local = yaml.safe_load(model_card(manifest(base="/data/models/base", kind="adapter", method="lora")).split("---\n")[1])
    assert "base_model" not in local and local["library_name"] == "peft"


def test_a_full_fine_tunes_card_shows_its_computed_learning_rate_and_none_of_loras_settings():
    card = model_card(manifest())
    assert "| lr | `2e-05` (the default) |" in card and "lora_r" not in card and "target_modules" not in card
    assert 'AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")' in card and "PeftModel" not in card


def test_a_cairn_spec_base_is_loaded_through_its_converted_folder_in_the_cards_peft_example():
    card = model_card(manifest(base="bundled:smollm2-135m", kind="adapter", method="lora", hyperparameters=TrainConfig().model_dump()))
    assert 'base = resolve_folder("bundled:smollm2-135m")' in card and "from cairn.models import resolve_folder" in card
    assert "| lora_alpha | `32` (the default) |" in card
