"""GGUF type names a recipe may ask for (kept free of heavy imports so recipe validation stays fast)."""
from __future__ import annotations

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPE_NAMES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # written by this project, codes carried over
DIRECT_TYPES = FLOAT_TYPES + BLOCK_TYPE_NAMES
# File types only llama.cpp's quantizer produces (mixes of K-quant and IQ tensor types).
LLAMA_FILE_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL",
                    "IQ4_XS")
FILE_TYPES = DIRECT_TYPES + LLAMA_FILE_TYPES
# Single tensor types accepted for the embedding and output overrides.
TENSOR_TYPES = DIRECT_TYPES + ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
# (bits, symmetric) of each block type, for matching a quantize stage to the type that keeps its codes.
BLOCK_GRIDS = {"Q4_0": (4, True), "Q4_1": (4, False), "Q5_0": (5, True), "Q5_1": (5, False), "Q8_0": (8, True)}
