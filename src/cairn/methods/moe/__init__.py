"""Mixtures of experts: LoRA-MoE (`lora_moe.py`), every router (`routing.py`) and router training
(`router_training.py`), the Mixtral export of full fine-tunes (`mixtral.py`), and the routing
statistics a contributor ships (`statistics.py`)."""
