"""The EZTinker Python SDK (public names are re-exported from `eztinker`)."""
