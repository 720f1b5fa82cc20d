"""w4kern: INT4-weight GPU kernels for LLM inference, compiled at run time by NVRTC.

CuPy arrays in -> CUDA kernels, CuPy out; NumPy arrays in -> the NumPy
reference path, NumPy out. See README.md for a tour.
"""
__version__ = "0.1.0"

from .formats import (  # noqa: E402
    FP8_E4M3_MAX,
    GROUP_SIZES,
    Q8_BLOCK_DTYPE,
    Int4TiledWeight,
    Int4Weight,
    Int8Weight,
    PerTokenFp8,
    PerTokenInt8,
    Q8Activations,
    bfloat16,
    float8_e4m3fn,
)
from .pack import (  # noqa: E402
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    prepare,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from .quant import (  # noqa: E402
    dequantize_per_token_fp8,
    dequantize_per_token_int8,
    dequantize_q8,
    quantize_per_token_fp8,
    quantize_per_token_int8,
    quantize_q8,
)
from .linear import linear  # noqa: E402
from . import moe  # noqa: E402
from . import io  # noqa: E402
from . import checkpoints  # noqa: E402
from . import interop  # noqa: E402
from .attention import decode_attention  # noqa: E402
from .interop import asarray  # noqa: E402
from .moe import fused_moe, moe_align_block_size, topk_route  # noqa: E402
from . import reference  # noqa: E402

__all__ = [
    "FP8_E4M3_MAX", "GROUP_SIZES", "Q8_BLOCK_DTYPE", "Int4TiledWeight", "Int4Weight", "Int8Weight",
    "PerTokenFp8", "PerTokenInt8", "Q8Activations", "bfloat16", "float8_e4m3fn",
    "dequantize_int4", "dequantize_int8", "pack_int4", "prepare", "quantize_int4", "quantize_int8",
    "unpack_int4", "dequantize_per_token_fp8", "dequantize_per_token_int8", "dequantize_q8",
    "quantize_per_token_fp8", "quantize_per_token_int8", "quantize_q8", "reference", "linear",
    "moe", "fused_moe", "moe_align_block_size", "topk_route", "io", "checkpoints", "interop", "asarray", "decode_attention",
    "__version__",
]
