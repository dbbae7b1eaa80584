"""A node's logs copied to the shared filesystem at its stop (ar_collect_node_logs in
scripts/ray_lib.sh), run by bash on files made here: newest first, `ray start`'s own
output always, gzip'd under their own names, and capped at AR_LOG_CAP_MB."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

RAY_LIB = Path(__file__).resolve().parents[1] / "scripts" / "ray_lib.sh"
MIB = 1024 * 1024


def collect(tmp_path: Path, cap_mb: int, logs: dict[str, float]) -> Path:
    """Session logs of the given sizes (MiB), oldest first, under a node temp dir; collect them."""
    cluster, node_tmp, dest = tmp_path / "cluster", tmp_path / "node", tmp_path / "logs"
    (cluster / "logs").mkdir(parents=True)
    (cluster / "logs" / "ray-head.log").write_text("ray start output\n")
    session = node_tmp / "r" / "session_2026-12-02_10-00-00_1" / "logs"
    session.mkdir(parents=True)
    for age, (name, size) in enumerate(reversed(list(logs.items()))):
        path = session / name
        path.write_bytes(b"x" * int(size * MIB))
        stamp = 1_700_000_000 - age * 60  # the first given is the oldest
        os.utime(path, (stamp, stamp))
    env = {"PATH": os.environ["PATH"], "AR_CLUSTER_DIR": str(cluster), "AR_LOGS_DIR": str(dest),
           "AR_LOG_CAP_MB": str(cap_mb)}
    subprocess.run(["bash", "-c", '. "$0" && ar_collect_node_logs head "$1"', str(RAY_LIB), str(node_tmp)],
                   env=env, check=True, timeout=60)
    return dest / "head"


def test_every_log_is_copied_gzipped_under_its_own_name(tmp_path):
    copied = collect(tmp_path, 50, {"gcs_server.out": 0.01, "raylet err file.out": 0.01, "dashboard.log": 0.01})
    names = sorted(p.name for p in copied.iterdir())
    assert names == ["HOST", "dashboard.log.gz", "gcs_server.out.gz", "ray-head.log.gz", "raylet err file.out.gz"]
    assert gzip.decompress((copied / "ray-head.log.gz").read_bytes()) == b"ray start output\n"
    assert len(gzip.decompress((copied / "raylet err file.out.gz").read_bytes())) == int(0.01 * MIB)
    assert not (copied / "CAPPED").exists()


def test_the_cap_keeps_ray_starts_output_and_the_newest_logs(tmp_path):
    copied = collect(tmp_path, 1, {"old.log": 0.6, "middle.log": 0.3, "new.log": 0.5})
    names = sorted(p.name for p in copied.iterdir())
    # newest first: new (0.5) fits, middle (0.8 in all) fits, old (1.4) is over the 1 MiB cap
    assert names == ["CAPPED", "HOST", "middle.log.gz", "new.log.gz", "ray-head.log.gz"]
    assert "older files left out" in (copied / "CAPPED").read_text()
