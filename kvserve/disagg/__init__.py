"""Prefill/decode disaggregation: engine roles and KV transfer between instances (docs/disaggregation.md).

    config.py     DisaggConfig: role (both|prefill|decode), transport URL, timeout
    params.py     kv_transfer_params: the JSON the router relays (vLLM's handshake), parsed and checked
    transport.py  KVTransport interface + registry by URL scheme; ShmTransport (shm://, same host)
    ray_transport.py  RayTransport (ray://, across hosts; `ray` optional, imported only for it)
    source.py     RemotePeerSource: the KV source that exports (prefill) and imports (decode) blocks
    setup.py      attach_disagg(core, runner, config): wires the source into an engine
    metrics.py    the Prometheus collector (instance_info, transfer outcomes, computed prompt tokens)

Entry points other code uses (keep them stable):
    kvserve.disagg.config.DisaggConfig, ROLES
    kvserve.disagg.setup.attach_disagg          (EngineCore.from_config)
    kvserve.disagg.transport.transport_for_url, register_transport, KVTransport
    kvserve.disagg.metrics.DisaggCollector      (kvserve.metrics.ServerMetrics)
    engine kwargs role=, kv_transfer=, kv_transfer_timeout=  (LLM / LLMEngine / kvserve serve --role ...)

Nothing here is imported by the plain-data layer or the core.
"""
