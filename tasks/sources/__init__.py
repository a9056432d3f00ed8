"""Reading runs: the LangSmith API at its rate limit, exported run-record files, the sample traces, and a source
as windows of whole traces."""
