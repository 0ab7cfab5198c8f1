"""A deployed SuperLink refuses SuperNodes that lack a registered key, TLS, or a valid certificate.

Real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1. The signal for "refused" is
the SuperNode exiting non-zero with Flower's own reason in its log (refused SuperNodes are started
with a bounded retry budget), and never printing ``SuperNode ID:``, which it prints only once the
SuperLink has accepted it. The first test is the positive control that these signals can change.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import (
    Federation,
    Procs,
    provision_loopback,
    run_until_exit,
    start_superlink,
    supernode_command,
    wait_online,
)

from common.crypto import pki
from server import deploy_flwr

# Real SuperLink/SuperNode processes on loopback (~2 min in all): part of the default run, because CI
# must show that unregistered keys, --insecure, a wrong CA and bad server certificates are refused.

ACCEPTED = "SuperNode ID:"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """SuperLink with TLS + node auth; site-1's key is registered, site-2's is not."""
    fed = provision_loopback(tmp_path_factory.mktemp("fed"), ["site-1", "site-2"])
    group = Procs(fed.out / "module-logs")
    try:
        start_superlink(group, fed)
        assert deploy_flwr.register(fed.env, fed.coordinator / "sites" / "site-1.pub", "site-1")
        yield fed
    finally:
        group.stop_all()


def _swap(cmd: list[str], flag: str, value: str | None) -> list[str]:
    """Replace (or with None, drop) ``flag VALUE`` in an argument list."""
    i = cmd.index(flag)
    return cmd[:i] + ([flag, value] if value is not None else []) + cmd[i + 2 :]


def test_registered_site_with_tls_comes_online(live: Federation, procs: Procs) -> None:
    procs.start("site-1", supernode_command(live, "site-1"), live.env)

    online = wait_online(live.env, 1)

    assert len(online) == 1
    assert ACCEPTED in procs.log("site-1")


def test_unregistered_key_is_refused(live: Federation, procs: Procs) -> None:
    code, log = run_until_exit(
        procs, "site-2", supernode_command(live, "site-2", bounded=True), live.env
    )

    assert code not in (0, None), log
    assert "Failed to activate SuperNode" in log
    assert ACCEPTED not in log


def test_supernode_without_auth_key_is_refused(live: Federation, procs: Procs) -> None:
    cmd = _swap(
        supernode_command(live, "site-1", bounded=True), "--auth-supernode-private-key", None
    )

    code, log = run_until_exit(procs, "no-key", cmd, live.env)

    assert code not in (0, None), log
    assert ACCEPTED not in log


def test_insecure_supernode_with_key_refuses_to_start(live: Federation, procs: Procs) -> None:
    cmd = _swap(supernode_command(live, "site-1", bounded=True), "--root-certificates", None)

    code, log = run_until_exit(procs, "insecure-key", [*cmd, "--insecure"], live.env)

    assert code not in (0, None), log
    assert "TLS is not enabled" in log
    assert ACCEPTED not in log


def test_insecure_supernode_cannot_reach_tls_superlink(live: Federation, procs: Procs) -> None:
    cmd = _swap(supernode_command(live, "site-1", bounded=True), "--root-certificates", None)
    cmd = _swap(cmd, "--auth-supernode-private-key", None)

    code, log = run_until_exit(procs, "insecure", [*cmd, "--insecure"], live.env)

    assert code not in (0, None), log
    assert "could not establish a connection" in log
    assert ACCEPTED not in log


def test_supernode_trusting_another_ca_is_refused(
    live: Federation, procs: Procs, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.crt"
    pki.write_public(other_ca, pki.create_ca().cert_pem())
    cmd = _swap(
        supernode_command(live, "site-1", bounded=True), "--root-certificates", str(other_ca)
    )

    code, log = run_until_exit(procs, "wrong-ca", cmd, live.env)

    assert code not in (0, None), log
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert ACCEPTED not in log


def test_expired_server_certificate_is_refused(procs: Procs, tmp_path: Path) -> None:
    fed = provision_loopback(tmp_path / "fed", ["site-1"], server_valid_days=-1)
    start_superlink(procs, fed, extra=["--isolation", "process"], verified_wait=False)

    code, log = run_until_exit(
        procs, "site-1", supernode_command(fed, "site-1", bounded=True), fed.env
    )

    assert code not in (0, None), log
    assert "certificate has expired" in log
    with pytest.raises(deploy_flwr.FlwrError):
        deploy_flwr.list_nodes(fed.env, timeout=60)


def test_server_certificate_for_another_host_is_refused(procs: Procs, tmp_path: Path) -> None:
    fed = provision_loopback(tmp_path / "fed", ["site-1"])
    ca = pki.load_ca(fed.out / "ca" / "ca.crt", fed.out / "ca" / "ca.key")
    other = pki.issue_server_cert(ca, ["fl.example.org"], include_loopback=False)
    pki.write_secret(fed.coordinator / "certs" / "server.key", other.key_pem(), force=True)
    pki.write_public(fed.coordinator / "certs" / "server.crt", other.cert_pem(), force=True)
    start_superlink(procs, fed, extra=["--isolation", "process"], verified_wait=False)

    code, log = run_until_exit(
        procs, "site-1", supernode_command(fed, "site-1", bounded=True), fed.env
    )

    assert code not in (0, None), log
    assert "certificate is not valid for '127.0.0.1'" in log
    assert ACCEPTED not in log
