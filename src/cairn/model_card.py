"""A contribution's model card, `README.md`: what it is and how to load it, written from its manifest.

PEFT's `save_pretrained` writes an empty template ("[More Information Needed]"); a party that
receives a contribution needs the base (and its fingerprint, which tells two bases of one
architecture apart), the task and its data hash, the method and its settings, what training or
merging measured, and the lines that load it with PEFT and with Cairn. The card's YAML header
holds the Hugging Face Hub's metadata keys (`library_name`, `base_model` where the base is a hub
id, `tags`), so a card pushed to the Hub is indexed as one.
"""

from __future__ import annotations

import json
import re

import yaml

from cairn.options import DEFAULT_LR

CARD = "README.md"
_HUB_ID = r"^[\w.-]+/[\w.-]+$"
_KINDS = {"adapter": "a PEFT LoRA adapter", "model": "a full Hugging Face model folder", "moe": "a Cairn LoRA-MoE folder (LoRA adapters and their router)"}


def _is_hub_id(base: str) -> bool:
    """Whether a recorded base is a hub id (Cairn records a local folder as its absolute path)."""
    return bool(re.match(_HUB_ID, base)) and not base.startswith((".", "/", "~"))


def _front_matter(manifest: dict) -> str:
    base, kind = str(manifest["base"]), manifest["kind"]
    meta = {"library_name": "peft" if kind == "adapter" else "transformers" if kind == "model" else "cairn"}
    if _is_hub_id(base):
        meta["base_model"] = base
    meta["tags"] = ["cairn", str(manifest["method"])]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _value(v) -> str:
    return f"`{json.dumps(v)}`" if not isinstance(v, str) else f"`{v}`"


def _settings(hyperparameters: dict) -> list[str]:
    """Table rows of a training's settings, the computed defaults (lr, lora_alpha) as their values,
    LoRA's own settings left out of a full fine-tune's."""
    method = hyperparameters.get("method")
    computed = {"lr": DEFAULT_LR.get(method), "lora_alpha": 2 * hyperparameters["lora_r"] if "lora_r" in hyperparameters else None}
    rows = []
    for key, value in hyperparameters.items():
        if key == "method" or method == "fft" and (key.startswith("lora_") or key == "target_modules"):
            continue
        shown = _value(value) if value is not None or computed.get(key) is None else f"{_value(computed[key])} (the default)"
        rows.append(f"| {key} | {shown} |")
    return rows


def _made(manifest: dict) -> list[str]:
    """The producer's measurements, as table rows."""
    rows = []
    if "train" in manifest:
        t = manifest["train"]
        losses = t.get("losses") or []
        rows.append(f"| made by | `cairn train`: {t.get('examples')} examples, {t.get('steps')} steps, {t.get('tokens')} answer tokens in {t.get('wall_s')} s |")
        if losses:
            rows.append(f"| training loss | {losses[0]:.4f} at the first step, {losses[-1]:.4f} at the last |")
    if "merge" in manifest:
        m = manifest["merge"]
        rows.append(f"| made by | `cairn merge` ({m.get('method')}, {m.get('combine', 'delta')}) of {len(m.get('inputs', []))} inputs, weights {m.get('weights')} |")
        rows.append(f"| merge options | {_value(m.get('options'))} |")
        rows.extend(f"| input | `{i}` |" for i in m.get("inputs", []))
        if "svd" in m:
            rows.append(f"| as an adapter | rank {m['svd']['rank']}, relative error {m['svd']['relative_error']:.4f} |")
    if "mix" in manifest:
        m = manifest["mix"]
        mixtral = m.get("method") == "mixtral"  # a Mixtral export records its inputs, and its settings at top level
        rows.append(f"| made by | `cairn mix`, router {m.get('router')}" + (", exported as a Mixtral model" if mixtral else "") + " |")
        settings = {k: m[k] for k in ("top_k", "shared", "temperature", "seed") if k in m} if mixtral else m.get("options")
        rows.append(f"| mix options | {_value(settings)} |")
        rows.extend(f"| expert | `{e}` |" for e in (m.get("inputs") if mixtral else m.get("experts")) or [])
    return rows


def _how_to_load(manifest: dict) -> str:
    base, kind = str(manifest["base"]), manifest["kind"]
    base_code = (
        f'"{base}"' if _is_hub_id(base) or base.startswith("/") else
        f'resolve_folder("{base}")  # the HF folder Cairn converts `{base}` into'
    )  # fmt: skip
    cairn_import = "" if _is_hub_id(base) or base.startswith("/") else "from cairn.models import resolve_folder\n"
    lines = ["## How to load it", ""]
    if kind == "adapter":
        lines += [
            "With PEFT, on its base (any copy whose fingerprint matches the one above):", "", "```python",
            f"{cairn_import}from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"base = {base_code}", "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), \"PATH/TO/THIS/FOLDER\")",
            "tokenizer = AutoTokenizer.from_pretrained(base)  # an adapter uses its base's tokenizer", "```", "",
        ]  # fmt: skip
    elif kind == "model":
        lines += [
            "With transformers (the folder is a whole model, tokenizer included):", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```", "",
        ]  # fmt: skip
    lines += [
        "With Cairn (it checks the base's fingerprint; `--base` names another copy of the base):", "", "```",
        "cairn eval --model PATH/TO/THIS/FOLDER --task TASK", 'cairn generate --model PATH/TO/THIS/FOLDER "PROMPT"',
        "cairn store add PATH/TO/THIS/FOLDER", "```",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def model_card(manifest: dict) -> str:
    """The card of the contribution `manifest` describes (the fields `contribution_manifest` writes)."""
    kind = manifest["kind"]
    rows = [
        "| | |", "|---|---|",
        f"| kind | {_KINDS.get(kind, kind)} |",
        f"| base | `{manifest['base']}` |",
        f"| base fingerprint | `{manifest['base_fingerprint']}` (sha256 of the base's config and weights, as `cairn.models.fingerprint` computes it) |",
        f"| task | `{manifest['task']}`" + (f", scored by {manifest['metric']}" if manifest.get("metric") else "") + " |",
    ]  # fmt: skip
    if manifest.get("data_hash"):
        rows.append(f"| data hash | `{manifest['data_hash']}` (sha256 of the task's examples) |")
    rows.append(f"| method | `{manifest['method']}` |")
    rows += _settings(manifest.get("hyperparameters") or {})
    rows += _made(manifest)
    title = f"# {manifest['task']}: {manifest['method']}"
    what = _KINDS.get(kind, kind)
    intro = (f"{what[0].upper()}{what[1:]}, made with Cairn. "
             "`cairn.json` beside this card records the same and every file's sha256 (`cairn store verify` checks them).")  # fmt: skip
    return "\n".join([_front_matter(manifest), title, "", intro, "", *rows, "", _how_to_load(manifest)])
