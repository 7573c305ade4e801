"""`kvserve router`: one OpenAI-compatible front for any number of serving instances.

Modules, bottom up:
  kv_index.py     which instance holds which KV blocks (by the engine's block hashes), LRU + TTL
  kv_events.py    the KV event format instances send (stored / removed / cleared) and its ingestion
  prompts.py      request body -> prompt token ids -> block hashes (the engine's own hash)
  instances.py    instance state: health, reported role, scraped load, in-flight counts
  scrape.py       Prometheus /metrics text -> an instance's load and role
  policies.py     routing policies behind one interface + registry: round-robin, least-load, kv-aware
  health.py       periodic /health and /metrics checks; removal and re-admission
  pd.py           prefill/decode pairing and the transfer-parameter relay between the two
  proxy.py        forwarding with retries; streams passed through byte for byte
  metrics.py      the router's own Prometheus metrics
  app.py          the FastAPI app;  cli.py: `kvserve router ...`
"""
