"""The smallest useful Ray job: which nodes answer, and a few tasks spread over them."""

import socket

import ray

ray.init()  # inside a Ray job: connects to the cluster that runs it


@ray.remote(num_cpus=1)
def where(i: int) -> str:
    return f"task {i} ran on {socket.gethostname()}"


print(f"hello from Ray {ray.__version__}: {len(ray.nodes())} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs")
for line in ray.get([where.remote(i) for i in range(4)]):
    print(line)
print("HELLO_RAY_OK")
