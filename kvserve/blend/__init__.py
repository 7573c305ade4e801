"""Non-prefix KV reuse (CacheBlend / Cache-Craft): document chunks cached under a
position-independent hash, placed at any position with re-rotated keys, and a few
tokens recomputed to restore cross-chunk attention.  See docs/cacheblend.md.

    spec.py          plain data: how a prompt splits into segments, the step's BlendStep
    chunk_source.py  the chunk cache, a KV source (core/kv_sources.py) in the device pool
    forward.py       the runner side: compute missing chunks, place, select, recompute
"""
