"""No scheduler (tasks/schedulers/direct.py): the job script and its launcher, run for real."""

from __future__ import annotations

import pytest

from tasks.schedulers import (
    DirectScheduler,
)
from tests.scheduler_helpers import (
    CLUSTER_DIR,
    CLUSTER_ID,
    assert_bash_syntax,
    make_fake_bin,
    read_lines,
    render,
    run_launch,
    settings,
)


def test_direct_script(tmp_path):
    script = render(settings(direct_workers=2))
    assert script.startswith("#!/usr/bin/env bash\n# activate-ray cluster ar-0123abcd (none)\n")
    assert "#SBATCH" not in script and "#PBS" not in script
    assert f"export AR_CLUSTER_DIR={CLUSTER_DIR}\n" in script
    assert script.rstrip().endswith('. "$AR_CLUSTER_DIR/bin/cluster_main.sh"')
    assert_bash_syntax(script, tmp_path)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_direct_launch_starts_each_worker(workers, tmp_path):
    calls = tmp_path / "nodes"
    script = DirectScheduler(settings(direct_workers=workers)).render(CLUSTER_ID, CLUSTER_DIR)
    fake_bin = make_fake_bin(tmp_path, {})
    prelude = f'ar_run_node() {{ printf "%s %s\\n" "$1" "$2" >>{calls}; }}\n'
    result = run_launch(script, tmp_path, fake_bin, {"AR_DIRECT_WORKERS": str(workers)}, prelude)
    assert result.returncode == 0, result.stderr
    assert sorted(read_lines(calls)) == [f"worker worker{i}" for i in range(1, workers + 1)]
