"""The shipped examples run as Ray jobs on a real local cluster (one flow run each, as the bed's user)."""

import pytest

from tests.helpers import REPO, SMALL, assert_nothing_left, run_flow

pytestmark = [pytest.mark.bed, pytest.mark.timeout(300)]


@pytest.mark.parametrize(
    "example,expect",
    [("distributed_compute.py", ["DISTRIBUTED_COMPUTE_OK", "pi ~= 3.1"]),
     ("gpu_workload.py", ["GPU_WORKLOAD_OK", "running on the CPU instead", "on cpu"])],
)
def test_example_runs(work, prefect_api, bed, example, expect):
    run = run_flow(
        bed, ["--user-script", REPO / "examples" / example, "--direct-workers", "1", "--work-dir", work / "w", *SMALL],
        work=work, api=prefect_api,
    )
    assert run.returncode == 0, run.output[-4000:]
    for text in expect:
        assert text in run.output
    assert_nothing_left(bed, run.cluster_id, work / "w")
