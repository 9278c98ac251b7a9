"""Train tiny-random on generated examples and write the loss curve to the JSON file named by
argv[1]. Run alone, or under `accelerate launch` by tests/distributed/. argv[2:] are TrainConfig
fields as KEY=VALUE (YAML values), and these:

- `checkpoint_dir=PATH`, `checkpoint_every=N`: checkpoint the training there;
- `stop_after_checkpoints=N`: every process exits right after its N-th checkpoint, as a run
  killed then would (exit code 3);
- `weights=PATH`: the main process saves the trained model's trainable weights there.

The JSON also gives `fsdp_groups`: for each sharding (FSDP2 launches), how many shard groups it made.

Every process writes the fingerprint of the model it holds after training to `<argv[1]>.rank<R>`.
"""

import json
import sys

import yaml
from accelerate import PartialState
from safetensors.torch import save_file

from cairn.checkpoints import Checkpoints
from cairn.data import Example
from cairn.distributed import is_main
from cairn.models import fingerprint, load_model
from cairn.options import TrainConfig
from cairn import training
from cairn.training import train

out, *fields = sys.argv[1:]
given = {k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in fields)}
script = {k: given.pop(k) for k in ("checkpoint_dir", "checkpoint_every", "stop_after_checkpoints", "weights") if k in given}
cfg = TrainConfig(**given)
if "stop_after_checkpoints" in script:
    save, saved = Checkpoints.save, []

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        saved.append(1)
        if len(saved) == script["stop_after_checkpoints"]:
            sys.exit(3)

    Checkpoints.save = save_then_stop
groups = []
shard = training.fsdp2_shard


def shard_and_count(accelerator, module, optimizer):
    from torch.distributed.fsdp import FSDPModule

    module, optimizer = shard(accelerator, module, optimizer)
    groups.append(sum(isinstance(m, FSDPModule) for m in module.modules()))
    return module, optimizer


training.fsdp2_shard = shard_and_count
model, tokenizer = load_model("tiny-random")
examples = [Example(f"Question: what is item {i}?\nAnswer:", f"thing{i} of kind {i % 3}" + " and more" * (i % 4)) for i in range(22)]
result = train(model, tokenizer, examples, cfg, progress=False, checkpoint_dir=script.get("checkpoint_dir"), checkpoint_every=script.get("checkpoint_every"))
state = PartialState()
with open(f"{out}.rank{state.process_index}", "w") as f:
    f.write(fingerprint(result.model))
if is_main():
    if "weights" in script:
        save_file({n: p.detach().contiguous() for n, p in result.model.named_parameters() if p.requires_grad}, script["weights"])
    with open(out, "w") as f:
        json.dump({"processes": state.num_processes, "losses": result.losses, "tokens": result.tokens, "steps": result.steps, "state_mb": result.state_mb, "fsdp_groups": groups}, f)
