"""Actions exactly once: the plan (rules, ids, sampling, follow-ups), the ledger and action log, the lease,
spike episodes, and the dispatch task that sends through the sinks."""
