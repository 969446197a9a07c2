"""What runs on the Ray cluster: the control plane and its store, the orchestrator, drivers,
the workflow replicas and their run engine, the HTTP API, and the deploy helpers that start
them."""
