"""Running the Triton kernels on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``), for tests.

Triton 3.6's interpreter turns a scalar into a one-element array and converts it with ``int(array)``, which numpy
2.4 and later reject for arrays that are not 0-d; `enable` repairs that one conversion.
"""
from __future__ import annotations

import os


def enable() -> None:
    """Call before the kernels module is imported: later `triton.jit` functions are interpreted on the CPU."""
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    if getattr(interpreter, "_compressor_index_fix", False) or not hasattr(interpreter, "_patch_lang_tensor"):
        return  # already done, or a Triton whose interpreter is laid out differently (then it needs no repair)
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._compressor_index_fix = True
