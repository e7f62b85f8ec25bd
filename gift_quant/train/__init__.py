"""Recovery training: GIFT-SW layers and noise, LoRA baseline, the loop, its data,
checkpoints and several processes."""
