"""ComfyUI node adapters. Each node is a schema plus one call into the pack's library code.

ComfyUI enters through the package's ``comfy_entrypoint`` (the repository's ``__init__.py``),
which builds the extension below and adds the job routes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .combined import NODES as COMBINED_NODES
from .diversity import NODES as DIVERSITY_NODES
from .rewards import NODES as REWARD_NODES
from .trainer import NODES as TRAINER_NODES


class RewardTuneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*COMBINED_NODES, *REWARD_NODES, *DIVERSITY_NODES, *TRAINER_NODES]


_ROUTES_ADDED = False


def add_routes() -> None:
    """The training-job routes on the running server (none when ComfyUI runs without one), and
    the job manager started, so jobs left by an earlier server are listed at once."""
    global _ROUTES_ADDED
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None or _ROUTES_ADDED:
        return
    from ..jobs.manager import get_manager
    from ..jobs.routes import register
    register(instance)
    get_manager()
    _ROUTES_ADDED = True
