"""The OpenAI-compatible API: its own router beside the REST API."""
