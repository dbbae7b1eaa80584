"""Spread work over every node: a Monte Carlo estimate of pi, one batch per CPU,
and a per-node tally that shows the cluster really is several machines."""

import collections
import random
import socket
import time

import ray

ray.init()


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def sample(batch: int, seed: int) -> tuple[str, int]:
    rng = random.Random(seed)
    inside = sum(1 for _ in range(batch) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return socket.gethostname(), inside


cpus = int(ray.cluster_resources().get("CPU", 1))
batches, batch = max(4, 4 * cpus), 200_000
start = time.perf_counter()
results = ray.get([sample.remote(batch, seed) for seed in range(batches)])
elapsed = time.perf_counter() - start
pi = 4 * sum(inside for _, inside in results) / (batches * batch)
per_host = collections.Counter(host for host, _ in results)
print(f"pi ~= {pi:.5f} from {batches * batch:,} samples in {elapsed:.2f}s on {len(ray.nodes())} node(s), {cpus} CPU(s)")
for host, count in sorted(per_host.items()):
    print(f"  {host}: {count} batches")
print("DISTRIBUTED_COMPUTE_OK")
