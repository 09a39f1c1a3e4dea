"""Test-only ComfyUI custom node: teaches ComfyUI the tiny SDXL-architecture fixtures.

Mounted into ``custom_nodes`` by the test and demo set-up only (never by users). Importing it registers
:class:`TinySDXL` at the front of ComfyUI's supported models, so the standard CheckpointLoaderSimple
detects and loads the tiny checkpoints that ``tools/make_tiny_models.py`` writes.
"""

from .tiny_sdxl import register

register()

NODE_CLASS_MAPPINGS: dict = {}
