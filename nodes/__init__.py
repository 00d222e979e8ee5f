"""ComfyUI node adapters. Each node is a schema plus one call into the pack's library code."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .combined import NODES as COMBINED_NODES
from .diversity import NODES as DIVERSITY_NODES
from .rewards import NODES as REWARD_NODES


class RewardTuneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*COMBINED_NODES, *REWARD_NODES, *DIVERSITY_NODES]


async def comfy_entrypoint() -> RewardTuneExtension:
    return RewardTuneExtension()
