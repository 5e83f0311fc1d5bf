"""mlora_pp: many LoRA adapters, one frozen base model, pipelined across ranks."""
