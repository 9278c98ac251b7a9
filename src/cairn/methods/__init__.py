"""Methods that combine contributions without earlier data: O-LoRA (`olora`) and merging (`merging`)."""
