"""The `morserve serve --ray` flags and the Ray Serve deployment options they make (no Ray import:
`morserve serve --help` works without the `ray` extra).

Replicas: a fixed `--num-replicas`, or autoscaling on ongoing requests when `--max-replicas` is
given (between `--min-replicas` and it, aiming at `--target-ongoing-requests` per replica). Each
replica takes `--num-cpus-per-replica` logical CPUs, runs torch on `--threads-per-replica` threads,
and, where the cluster has GPUs (or `--num-gpus-per-replica 1`), one GPU: Ray then sets
CUDA_VISIBLE_DEVICES so the replica's `cuda` is its own device. `--max-ongoing-requests` (default
--max-num-seqs) caps what Ray hands one replica: beyond it requests wait in Ray's router, which
sends each to the less loaded of two replicas (power of two choices on queue length).
"""

from __future__ import annotations

import argparse
from typing import Any


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray Serve (scale-out; needs `pip install morserve[ray]`)")
    g.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve replicas (each one engine) instead of one process")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster is started)")
    g.add_argument("--num-replicas", type=int, default=1, help="replicas (fixed; see --max-replicas)")
    g.add_argument("--min-replicas", type=int, default=None,
                   help="autoscaling lower bound (default 1; only with --max-replicas)")
    g.add_argument("--max-replicas", type=int, default=None,
                   help="autoscale on ongoing requests between --min-replicas and this")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling target of ongoing requests per replica (default: --max-num-seqs)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests Ray sends one replica at once (default: --max-num-seqs)")
    g.add_argument("--num-cpus-per-replica", type=float, default=None,
                   help="logical CPUs each replica reserves (default: --threads-per-replica)")
    g.add_argument("--threads-per-replica", type=int, default=1, help="torch threads in each replica")
    g.add_argument("--num-gpus-per-replica", type=float, default=None,
                   help="GPUs each replica reserves (default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--replica-metrics-port", type=int, default=8100,
                   help="the replica of local rank k on a node serves Prometheus /metrics on this + k "
                        "(0: off; the Serve port's /metrics answers for whichever replica it reaches)")


def check_ray_arguments(ns: argparse.Namespace) -> None:
    """ValueError naming the flag whose value cannot work."""
    positive = {"--num-replicas": ns.num_replicas, "--threads-per-replica": ns.threads_per_replica,
                "--max-ongoing-requests": ns.max_ongoing_requests, "--max-replicas": ns.max_replicas}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if ns.min_replicas is not None:
        if ns.max_replicas is None:
            raise ValueError("--min-replicas needs --max-replicas (autoscaling)")
        if not 0 <= ns.min_replicas <= ns.max_replicas:
            raise ValueError(f"--min-replicas must be in [0, --max-replicas={ns.max_replicas}], got {ns.min_replicas}")
    if ns.target_ongoing_requests is not None and ns.target_ongoing_requests <= 0:
        raise ValueError(f"--target-ongoing-requests must be > 0, got {ns.target_ongoing_requests}")
    for flag, value in (("--num-cpus-per-replica", ns.num_cpus_per_replica),
                        ("--num-gpus-per-replica", ns.num_gpus_per_replica)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if not 0 <= ns.replica_metrics_port <= 65535:
        raise ValueError(f"--replica-metrics-port must be in [0, 65535], got {ns.replica_metrics_port}")


def replica_gpus(ns: argparse.Namespace, cluster_gpus: float) -> float:
    """GPUs one replica reserves: the flag, else one when the cluster has any (unless --device cpu)."""
    if ns.num_gpus_per_replica is not None:
        return ns.num_gpus_per_replica
    on_cpu = ns.device is not None and ns.device.startswith("cpu")
    return 1.0 if cluster_gpus >= 1 and not on_cpu else 0.0


def deployment_options(ns: argparse.Namespace, cluster_gpus: float) -> dict[str, Any]:
    """Keyword arguments of `Deployment.options(...)` for these flags."""
    gpus = replica_gpus(ns, cluster_gpus)
    options: dict[str, Any] = {
        "max_ongoing_requests": ns.max_ongoing_requests or ns.max_num_seqs,
        "ray_actor_options": {"num_cpus": ns.threads_per_replica if ns.num_cpus_per_replica is None
                              else ns.num_cpus_per_replica, "num_gpus": gpus},
        "graceful_shutdown_timeout_s": ns.shutdown_timeout,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if ns.max_replicas is not None:
        lowest = 1 if ns.min_replicas is None else ns.min_replicas
        options["autoscaling_config"] = {
            "min_replicas": lowest, "max_replicas": ns.max_replicas,
            "initial_replicas": min(max(ns.num_replicas, lowest), ns.max_replicas),
            "target_ongoing_requests": ns.target_ongoing_requests or ns.max_num_seqs}
    else:
        options["num_replicas"] = ns.num_replicas
    return options
