"""Scale-out: morserve replicas on Ray Serve (ray_flags: the `morserve serve --ray` flags, importable
without Ray; ray_app: the Serve deployment and application, needs `pip install morserve[ray]`)."""
