"""The shipped examples run as Ray jobs on a real local cluster (one flow run each)."""

import pytest

from tests.conftest import REPO, assert_nothing_left, run_flow

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize(
    "example,expect",
    [("distributed_compute.py", ["DISTRIBUTED_COMPUTE_OK", "pi ~= 3.1"]),
     ("gpu_workload.py", ["GPU_WORKLOAD_OK", "running on the CPU instead", "on cpu"])],
)
def test_example_runs(tmp_path, prefect_api, example, expect):
    work = tmp_path / "work"
    run = run_flow(
        ["--user-script", str(REPO / "examples" / example), "--direct-workers", "1", "--work-dir", str(work),
         "--ray-memory-gb", "0.5", "--object-store-memory-gb", "0.25"],
        tmp=tmp_path, api=prefect_api,
    )
    assert run.returncode == 0, run.output[-4000:]
    for text in expect:
        assert text in run.output
    assert_nothing_left(work, cluster_id=run.info["cluster_id"])
