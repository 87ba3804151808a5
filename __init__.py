"""ComfyUI entry point of the AcT node pack: registration only.

Importing this file outside ComfyUI does nothing heavy: the nodes (and torch) load only when
ComfyUI calls `comfy_entrypoint`. `WEB_DIRECTORY` holds the front-end script that draws the
nodes' summaries on the canvas and shows mode-specific inputs only in their mode.
"""

WEB_DIRECTORY = "./nodes/web"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension (called by ComfyUI at start-up)."""
    from .nodes.extension import ActExtension

    return ActExtension()
