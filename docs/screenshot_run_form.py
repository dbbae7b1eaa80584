"""The README's picture of the run form: the real Prefect UI, headless Chromium.

    .venv/bin/python docs/screenshot_run_form.py [deployment] [out.png]   (make screenshot)

Starts a Prefect server on loopback with a PREFECT_HOME of its own, creates the
process pool, deploys prefect.yaml, and has Chromium (Debian's `chromium`;
`apt-get install chromium`) render the deployment's "Custom run" form to a PNG.
Nothing leaves loopback: Chromium's background networking is off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import REPO, PrefectServer  # noqa: E402 (the checkout's tests/, found from here)

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=30000", "--window-size=1280,3800",
]


def prefect(server: PrefectServer, *args: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_CLUSTER_"))},
           "PREFECT_API_URL": server.url, "PREFECT_HOME": str(server.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(REPO)}
    subprocess.run([str(server.prefect), *args], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)


def deployment_id(server: PrefectServer, name: str) -> str:
    with urllib.request.urlopen(f"{server.url}/deployments/name/ray-cluster/{name}", timeout=10) as response:
        return json.load(response)["id"]


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "slurm"
    out = Path(argv[1] if len(argv) > 1 else REPO / "docs" / f"run-form-{name}.png").resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("needs Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ar-ui-") as home:
        server = PrefectServer(Path(home) / "prefect").start()
        try:
            prefect(server, "work-pool", "create", "activate-ray-pool", "--type", "process")
            prefect(server, "deploy", "--name", name)
            url = f"http://127.0.0.1:{server.port}/deployments/deployment/{deployment_id(server, name)}/run"
            subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={home}/chromium", f"--screenshot={out}", url],
                           check=True, capture_output=True, timeout=120)
        finally:
            server.stop()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
