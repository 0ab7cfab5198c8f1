"""docs/deploy.md section 10, the loopback rehearsal, run verbatim.

The block after ``<!-- rehearsal -->`` in the guide is read and run as one ``bash`` script, in order,
with the services as its background jobs, exactly as an IT team would paste it. Only two things are
read differently: ``/opt/facefed`` (the checkout) is this checkout, and ``/tmp/fl`` is a fresh
temporary folder; the checkout's venv is first on ``PATH``. Then: both runs completed, the first
run's ledger verified, revoked site-2 was refused, and the coordinator restarted on the rotated
certificate. Each traced command carries a timestamp (``PS4``), so the wall time from ``deploy init``
to the verified ledger is read from the trace and printed (``-s`` shows it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.crypto import pki
from common.paths import REPO_ROOT
from server import deploy_provision

GUIDE = REPO_ROOT / "docs" / "deploy.md"
MARK = "<!-- rehearsal -->"
PORTS = (9091, 9092, 9093, 9094, 9095)  # the guide's fixed loopback ports
TIMEOUT_S = 3600.0


def rehearsal_block(text: str) -> str:
    """The ``sh`` code block right after the ``<!-- rehearsal -->`` mark."""
    found = re.search(re.escape(MARK) + r"\s*```sh\n(.*?)\n```", text, flags=re.DOTALL)
    if found is None:
        raise AssertionError(f"{GUIDE}: no ```sh block after {MARK}")
    return found.group(1)


def localise(block: str, tmp: Path) -> str:
    """The block with the checkout and ``/tmp/fl`` of the guide moved to this machine's."""
    block = re.sub(r"/opt/facefed\b", str(REPO_ROOT), block)
    return re.sub(r"/tmp/fl\b", str(tmp / "fl"), block)


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ours(root: Path) -> list[int]:
    """Processes whose command line names a path under ``root`` (the kits this test made)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if str(root).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return [pid for pid in found if pid != os.getpid()]


def _stop(proc: subprocess.Popen[str], root: Path) -> None:
    """End the script's process group and every process started from its kits, by pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _ours(root):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        time.sleep(3.0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _traced_at(trace: str, command: str) -> float:
    """When the first traced command starting with ``command`` began (``PS4`` timestamps)."""
    for line in trace.splitlines():
        stamp, _, rest = line.lstrip("+").partition(" ")
        if rest.startswith(command):
            return float(stamp)
    raise AssertionError(f"{command!r} was never run:\n{trace[-3000:]}")


@pytest.mark.slow
def test_the_guides_rehearsal_runs_verbatim(tmp_path: Path) -> None:
    if not (REPO_ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("the rehearsal reads the data from ../shared/data beside the checkout")
    if taken := [p for p in PORTS if _port_taken(p)]:
        pytest.skip(f"the guide's ports {taken} are taken on this machine")
    script = localise(rehearsal_block(GUIDE.read_text(encoding="utf-8")), tmp_path)
    fl = tmp_path / "fl"
    env = {k: v for k, v in os.environ.items() if k not in {"FACEFED_DATA", "FACEFED_KIT_KEY"}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # PS4 in the script: bash ignores an inherited one when run as root
    header = "PS4='+$EPOCHREALTIME '\nset -x\ntrap 'echo \"FAILED($?): $BASH_COMMAND\"' ERR\n"
    log = tmp_path / "rehearsal.log"

    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", header + script], env=env, cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=TIMEOUT_S)
        finally:
            _stop(proc, tmp_path)
    output = log.read_text(errors="replace")
    coord = deploy_provision.coordinator_dir(fl)

    failed = [line for line in output.splitlines() if line.startswith("FAILED(")]
    assert not [f for f in failed if "facefed" in f], "\n".join(failed) + output[-5000:]
    # both runs completed, as `flwr ls` judged them
    assert len(re.findall(r"^run \d+: finished:completed", output, flags=re.M)) == 2, output[-5000:]
    # the first run's ledger verified, pinned to the coordinator's key, with secret noise
    assert "OK: chain, signatures, run id, rounds and every epsilon verified" in output
    # site-2 revoked and refused
    assert "site site-2 unregistered; its key is refused from now on" in output
    assert "its key is revoked" in output and "site-2 refused, as it should be" in output
    # the coordinator restarted on a new server certificate; the old one is denied
    denied = (coord / "revoked.txt").read_text()
    serial = pki.cert_serial((coord / "certs" / "server.crt").read_bytes())
    assert re.search(r"^cert \S+ server rotated", denied, flags=re.M) and serial not in denied
    assert (fl / "coordinator-2.out").exists()
    second = json.loads((coord / "runs" / "default" / "results.json").read_text())
    assert second["status"] == "completed" and second["config"]["num-sites"] == 1
    assert {site for r in second["rounds"] for site in r["clients"]} == {"site-1"}

    verified = _traced_at(output, "facefed deploy revoke")  # the next command after audit verify
    wall = verified - _traced_at(output, "facefed deploy init")
    print(f"\nrehearsal: deploy init -> verified ledger {wall:.0f} s")


def test_the_rehearsal_block_is_in_the_guide_and_runs_nothing_outside_its_folders(
    tmp_path: Path,
) -> None:
    script = localise(rehearsal_block(GUIDE.read_text(encoding="utf-8")), tmp_path)

    assert "facefed deploy init" in script and "facefed audit verify" in script
    assert "/tmp/fl" not in script.replace(str(tmp_path / "fl"), "")
    assert "/opt/facefed" not in script
    assert subprocess.run(["bash", "-n", "-c", script], check=False).returncode == 0
