"""Train tiny-random on generated examples and write the loss curve to the JSON file named by
argv[1]; argv[2:] are TrainConfig fields as KEY=VALUE (YAML values). Run alone, or under
`accelerate launch` by tests/distributed/test_launch.py."""

import json
import sys

import yaml

from cairn.data import Example
from accelerate import PartialState

from cairn.distributed import is_main
from cairn.models import load_model
from cairn.options import TrainConfig
from cairn.training import train

out, *fields = sys.argv[1:]
cfg = TrainConfig(**{k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in fields)})
model, tokenizer = load_model("tiny-random")
examples = [Example(f"Question: what is item {i}?\nAnswer:", f"thing{i} of kind {i % 3}" + " and more" * (i % 4)) for i in range(22)]
result = train(model, tokenizer, examples, cfg, progress=False)
if is_main():
    with open(out, "w") as f:
        json.dump({"processes": PartialState().num_processes, "losses": result.losses, "tokens": result.tokens, "steps": result.steps}, f)
