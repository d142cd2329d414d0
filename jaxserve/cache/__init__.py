"""KV-cache storage (device) and page bookkeeping (host)."""
