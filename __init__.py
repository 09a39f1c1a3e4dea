"""MEPG for ComfyUI: multi-expert planning and generation as ComfyUI nodes.

Kept tiny on purpose: ComfyUI imports this file when it scans custom_nodes, so heavy imports wait
until the node list is asked for.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import MEPGExtension

    return MEPGExtension()
