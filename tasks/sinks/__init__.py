"""The outside systems actions go to (LangSmith, Slack, webhooks, Prefect events), and `connections`: the only
place where blocks and env become clients."""
