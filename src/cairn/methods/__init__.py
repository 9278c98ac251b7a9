"""Each method family in one place, its pure tensor math beside its I/O: `merge/` (merging, with
mergekit's semantics), `moe/` (mixtures of experts: LoRA-MoE, Mixtral export, routers, routing
statistics), `olora.py` (O-LoRA's penalty and stacked adapters), `replay.py` (drawing replayed
examples). The strategies that run them over a task stream live in `cairn.strategies`."""
