"""MEPG core: the method in plain torch/numpy. Imports no ComfyUI module.

Submodules use relative imports only, so the package works both as a top-level ``mepg_core`` (tests,
command lines) and inside the pack when ComfyUI loads it under the folder's name.
"""

__all__ = ["layout"]
