"""RewardTune: reward fine-tuning (ReFL, ImageReFL, SQDF) and combined generation for ComfyUI.

ComfyUI loads this package from custom_nodes/ and calls ``comfy_entrypoint`` (V3 node API). The
node modules import ComfyUI, so they are imported only then: the library packages (``sampling``,
``testing`` …) can be imported by tests and scripts before ComfyUI's arguments are set.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import RewardTuneExtension, add_routes

    try:
        add_routes()
    except Exception:  # the job routes or the jobs folder: the nodes must load all the same
        import logging
        logging.getLogger("rewardtune").exception("RewardTune: the training-job routes could not start; "
                                                  "the nodes are loaded, the Training tab is not")
    return RewardTuneExtension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
