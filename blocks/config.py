"""A loop config kept in Prefect, editable in the UI and named by deployments."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from tasks.config import LoopConfig


class LoopConfigBlock(Block):
    """A tracetriage loop: source, window, evaluators, actions, snapshots, spike settings.

    >>> from tasks.config import load_config
    >>> LoopConfigBlock(config=load_config("loop.yaml")).save("support-bot")  # doctest: +SKIP

    Then run a deployment with the parameter `config_block: support-bot`.
    """

    _block_type_name = "tracetriage loop config"
    _description = "A tracetriage feedback loop's config (the same model as loop.yaml and the flows' parameter)."

    config: LoopConfig = Field(default_factory=LoopConfig, description="The loop config.")

    def get_config(self) -> LoopConfig:
        return self.config
