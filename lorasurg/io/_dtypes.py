"""The safetensors dtype codes (``"BF16"``, ``"F32"``, ...) and the torch dtypes they stand for.

One table, used by the reader (to report a tensor's dtype from a file header without reading it) and by the
writer (to write headers). Packed sub-byte dtypes (``F4``, ``F6_*``) are not in it: lorasurg neither reads nor
writes them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import UnsupportedError

__all__ = ["DTYPE_OF_CODE", "CODE_OF_DTYPE", "dtype_of_code", "code_of_dtype", "tensor_nbytes"]

_CANDIDATES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

# Only the dtypes this torch build has (old builds lack the unsigned and float8 types).
DTYPE_OF_CODE: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _CANDIDATES.items() if hasattr(torch, name)
}
CODE_OF_DTYPE: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_OF_CODE.items()}


def dtype_of_code(code: str, where: str = "") -> torch.dtype:
    """The torch dtype of a safetensors dtype code.

    Raises:
        UnsupportedError: the code is not one lorasurg handles (e.g. packed ``F4``); ``where`` names the tensor.
    """
    try:
        return DTYPE_OF_CODE[code]
    except KeyError:
        raise UnsupportedError(
            f"{where or 'tensor'} has safetensors dtype {code!r}, which lorasurg does not handle "
            f"(supported: {', '.join(sorted(DTYPE_OF_CODE))}); convert it to a supported dtype first"
        ) from None


def code_of_dtype(dtype: torch.dtype, where: str = "") -> str:
    """The safetensors dtype code of a torch dtype.

    Raises:
        UnsupportedError: safetensors has no code for ``dtype`` (or lorasurg does not write it).
    """
    try:
        return CODE_OF_DTYPE[dtype]
    except KeyError:
        raise UnsupportedError(
            f"{where or 'tensor'} has dtype {dtype}, which cannot be written to safetensors by lorasurg; "
            "cast it to a float or integer dtype first"
        ) from None


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes a dense tensor of ``shape`` and ``dtype`` occupies: ``prod(shape) * itemsize``."""
    return math.prod(shape) * dtype.itemsize
