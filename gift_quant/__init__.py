"""gift_quant: post-training quantization recovery for LLMs.

GPTQ/RTN with FP16 salient columns, GIFT-SW fine-tuning of those columns, mixed-precision
safetensors export, and a torch/Triton dequant-matmul.
"""

__version__ = "0.1.0"
