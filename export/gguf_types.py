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
# The code width each quantized file type stands for: a quantized layer of another width (a mixed-precision plan)
# gets its own type (LAYER_TYPES) instead of being re-quantized to the file's.
FILE_TYPE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q2_K": 2, "Q3_K_S": 3, "Q3_K_M": 3,
                  "Q3_K_L": 3, "Q4_K_S": 4, "Q4_K_M": 4, "Q5_K_S": 5, "Q5_K_M": 5, "Q6_K": 6, "IQ4_NL": 4, "IQ4_XS": 4}
# (bits, symmetric) -> the tensor type for a layer of that width: a block type where one keeps the codes, otherwise
# llama.cpp's K-quant of that width (llama.cpp falls back per tensor where rows are not multiples of 256).
LAYER_TYPES = {(2, True): "Q2_K", (2, False): "Q2_K", (3, True): "Q3_K", (3, False): "Q3_K", (4, True): "Q4_0",
               (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1", (6, True): "Q6_K", (6, False): "Q6_K",
               (8, True): "Q8_0", (8, False): "Q8_0"}
