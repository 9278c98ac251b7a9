"""Merging: per-tensor math and its `METHODS` table (`methods.py`), its numba kernels
(`kernels.py`), merging folders on disk one parameter at a time (`streaming.py`), merging LoRA
factors as PEFT does (`factors.py`), how much contributions share (`interference.py`), and
mergekit YAML configs (`mergekit.py`)."""
