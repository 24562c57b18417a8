"""stepscope's training engine: LoRA runs that record every optimizer step."""
