"""Launching kvserve on Ray: `kvserve serve MODEL --replicas N` or `--pd P:D` (docs/disaggregation.md,
"Launching").

  plan.py      pure: instance specs, core shares, the instances' and the router's command lines
  actors.py    ProcessActor: the Ray actor that runs one `kvserve serve|router` child, pinned to cores
  cluster.py   the Ray cluster: a local `ray start --head --block`, or an existing one (--ray-address)
  launcher.py  run_launch: cluster, instance actors, router actor, supervision, shutdown
  cli_args.py  the launch flags of `kvserve serve`

Ray is optional: nothing here imports it until a launch runs.
"""
