"""Real vLLM CPU server fixtures (owned by the serving work)."""
