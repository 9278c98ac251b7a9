"""Cairn's PEFT paths against PEFT itself, on real contributions of the bundled model.

- `combine: factors` (TIES on the A and B factors, weights 1): Cairn's adapter against PEFT's
  `add_weighted_adapter(..., combination_type="ties")` on the same adapters, tensor by tensor;
- `router: arrow`, with and without GenKnowSub (`general: mean`): the mixture's logits against
  PEFT's `create_arrow_model` on the packs' test prompts, and the experts' prototype similarity
  (mean |cos| between experts' top right-singular vectors) that explains Arrow's routing.

    .venv/bin/python bench/peft_paths.py --adapters A B C --tasks pack:people?facts=30 ...

The tests check the same equalities on tiny-random adapters; this measures them at scale.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from cairn.data.loaders import load_task
from cairn.methods.merge.streaming import merge_models
from cairn.methods.moe.diagnostics import prototype_similarity
from cairn.methods.moe.lora_moe import attach_experts
from cairn.models import load_model, resolve_folder
from cairn.options import MergeOptions, MoeOptions

BASE = "bundled:smollm2-135m"


def factors_against_peft(adapters: list[Path], density: float) -> dict:
    from peft import PeftModel, get_peft_model_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        merge_models(resolve_folder(BASE), adapters, Path(tmp) / "m", MergeOptions(method="ties", density=density, combine="factors"), made_from={"base": BASE, "base_fingerprint": "-"}, progress=False)
        cairn_s = time.perf_counter() - start
        ours = load_file(Path(tmp) / "m" / "adapter_model.safetensors")
    model, _ = load_model(BASE)
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(str(a), adapter_name=f"a{i}")
    start = time.perf_counter()
    model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], [1.0] * len(adapters), "merged", combination_type="ties", density=density)
    peft_s = time.perf_counter() - start
    theirs = {k: v.float().numpy() for k, v in get_peft_model_state_dict(model, adapter_name="merged").items()}
    assert sorted(ours) == sorted(theirs), "the two merges name different tensors"
    diff = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)
    scale = max(float(np.abs(v).max()) for v in theirs.values())
    return {"tensors": len(ours), "max_abs_diff": diff, "largest_entry": scale, "cairn_s": cairn_s, "peft_s": peft_s}


def arrow_against_peft(adapters: list[Path], prompts: list[str], general: str | None) -> dict:
    from peft import ArrowConfig, create_arrow_model

    opts = MoeOptions(router="arrow", top_k=3, temperature=1.0, general=general)
    model, tok = load_model(BASE)
    ours = attach_experts(model, adapters, opts).eval()
    reference, _ = load_model(BASE)
    gks = [str(a) for a in adapters] if general == "mean" else None
    theirs = create_arrow_model(reference, [str(a) for a in adapters], ArrowConfig(top_k=3, router_temperature=1.0, use_gks=gks is not None, rng_seed=0), general_adapter_paths=gks).eval()
    diff = 0.0
    with torch.no_grad():
        for i in range(0, len(prompts), 8):
            batch = tok(prompts[i : i + 8], return_tensors="pt", padding=True)
            a, b = ours(**batch).logits, theirs(**batch).logits
            mask = batch["attention_mask"].bool()
            diff = max(diff, float((a - b).abs()[mask].max()))
    similarity = prototype_similarity(adapters, general)
    return {"prompts": len(prompts), "max_abs_logit_diff": diff, "prototype_mean_abs_cos": similarity["mean_abs_cos"], "prototype_share_above_0.5": similarity["share_above_0.5"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", type=Path, required=True, help="LoRA adapter folders of the bundled model (one rank)")
    parser.add_argument("--tasks", nargs="+", default=["pack:people?facts=30", "pack:compounds?facts=30", "pack:companies?facts=30"], help="whose test prompts the logits are compared on")
    parser.add_argument("--density", type=float, default=0.2, help="TIES density (the reference study's 0.2)")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompts = [e.prompt for t in args.tasks for e in load_task(t).test]
    print("factors (TIES):", factors_against_peft(args.adapters, args.density))
    for general in (None, "mean"):
        print(f"arrow (general {general}):", arrow_against_peft(args.adapters, prompts, general))


if __name__ == "__main__":
    main()
