"""Files: the mixed-precision export, its loader, the transformers hook and the GPTQ + LoRA
engine view."""
