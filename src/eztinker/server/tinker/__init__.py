"""The Tinker protocol: its own router beside the REST API."""
