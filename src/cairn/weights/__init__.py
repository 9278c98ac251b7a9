"""Reading weights: safetensors files and folders with their headers checked (`tensor_files.py`),
and PEFT LoRA adapters as tensors or as merge inputs (`adapters.py`)."""
