"""python -m ldm batch --ray local as a user runs it: the command starts its own Ray cluster, on
127.0.0.1 only, renders, and stops every process of that cluster before it exits."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

import psutil
import pytest

from tests.helpers import batch_args

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(find_spec("ray") is None,
                                 reason="Ray is an optional extra: pip install -r requirements-ray.txt")]

ROOT = Path(__file__).resolve().parents[1]


def processes_of(session_root: str) -> list[psutil.Process]:
    """The processes whose command line names ``session_root`` (each Ray process names its session's folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(session_root in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is 127.0.0.1


def test_ray_local_starts_a_loopback_cluster_and_stops_it(batch_prompts, tmp_path):
    root = tempfile.mkdtemp(prefix="ldmray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_TMPDIR": root, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "ldm", *batch_args(batch_prompts, tmp_path, "--ray", "local"), "--steps", "1"]
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listening = set()
    try:
        while run.poll() is None:  # the addresses the cluster's processes listen on, while it runs
            for process in processes_of(root):
                try:
                    listening |= {c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
                except psutil.Error:
                    pass
            try:
                run.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        output = run.stdout.read()
    finally:
        if run.poll() is None:
            run.kill()
        _, left = psutil.wait_procs(processes_of(root), timeout=10)  # a moment to exit after the driver
        for process in left:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)
    assert run.returncode == 0, output
    assert "6 rendered, 0 already there, 0 failed" in output
    assert len(list(tmp_path.glob("*.png"))) == 6
    assert listening and all(is_loopback(address) for address in listening), listening
    assert not left, f"processes of the command's cluster outlived it: {[p.pid for p in left]}"
