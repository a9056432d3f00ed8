"""LangSmith credentials: the API key, endpoint and workspace tracetriage reads runs from and writes to."""

from __future__ import annotations

import os

from langsmith import Client
from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from tasks.config import ConfigError

DEFAULT_API_URL = "https://api.smith.langchain.com"


class LangSmithCredentials(Block):
    """A LangSmith API key, endpoint and workspace; empty fields fall back to the environment.

    >>> LangSmithCredentials(api_key="lsv2_...", workspace_id="...").save("langsmith")  # doctest: +SKIP
    >>> client = LangSmithCredentials.load("langsmith").get_client()  # doctest: +SKIP

    Environment fallbacks: `LANGSMITH_API_KEY`, `LANGSMITH_ENDPOINT`, `LANGSMITH_WORKSPACE_ID`.
    """

    _block_type_name = "tracetriage LangSmith credentials"
    _description = "API key, endpoint and workspace for reading runs from and writing feedback to LangSmith."

    api_key: SecretStr | None = Field(None, description="LangSmith API key; else $LANGSMITH_API_KEY.")
    api_url: str | None = Field(None, description=f"API endpoint; else $LANGSMITH_ENDPOINT, else {DEFAULT_API_URL}.")
    workspace_id: str | None = Field(None, description="Workspace (tenant) id for org-scoped keys; else "
                                                       "$LANGSMITH_WORKSPACE_ID.")

    def resolved_api_url(self) -> str:
        return (self.api_url or os.environ.get("LANGSMITH_ENDPOINT") or DEFAULT_API_URL).rstrip("/")

    def get_client(self) -> Client:
        """A `langsmith.Client` for these credentials; raises ConfigError when there is no API key at all."""
        key = self.api_key.get_secret_value() if self.api_key else os.environ.get("LANGSMITH_API_KEY")
        if not key:
            raise ConfigError("no LangSmith API key: set LANGSMITH_API_KEY or save a LangSmithCredentials block "
                              "and name it in source.credentials")
        workspace = self.workspace_id or os.environ.get("LANGSMITH_WORKSPACE_ID") or None
        # Our own retries pace every request under the rate limits; the SDK's would not wait for our bucket.
        return Client(api_url=self.resolved_api_url(), api_key=key, workspace_id=workspace,
                      auto_batch_tracing=False)
