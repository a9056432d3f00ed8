"""What the scores mean: verdicts (pass / fail / error), the culprit span of each failure, the failure modes,
and trends and spikes across windows."""
