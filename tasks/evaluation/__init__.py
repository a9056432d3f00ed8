"""Scoring runs with evaluators: binding them, calling them (concurrency, timeouts, retries, rate limits), the
judge cache, the trace tree evaluators read, and the evaluate task with its worker processes."""
