"""Fixtures for kv_store tests; helpers live in kvstore_helpers.py."""
from tests.unit.kv_store.kvstore_helpers import ns, redis_process, redis_url  # noqa: F401  (pytest fixtures)
