"""A deployed coordinator refuses SuperNodes that lack a registered key, TLS, or a valid certificate,
and refuses Control API calls from anyone but its own loopback.

Real ``flower-superlink`` / gateway / ``flower-supernode`` processes on this machine. The signal for
"refused" is the SuperNode exiting non-zero with Flower's own reason in its log (refused SuperNodes
are started with a bounded retry budget), and never printing ``SuperNode ID:``, which it prints only
once the SuperLink has accepted it. The first test is the positive control that these signals can
change. The Control API tests play a party that holds the public ``ca.crt`` and dials the
coordinator's public address from a non-loopback address of this machine.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import (
    Federation,
    Procs,
    listening_sockets,
    non_loopback_ipv4,
    provision_loopback,
    run_until_exit,
    start_superlink,
    supernode_command,
    wait_online,
)

from common.crypto import pki
from server import deploy, deploy_flwr

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


# --- the Control API is not open to sites (attack: a party holding only ca.crt) ----------------


def _attacker_env(fed: Federation, home: Path, address: str) -> dict[str, str]:
    """A ``flwr`` environment holding nothing but the public ``ca.crt`` (as every site kit does)."""
    home.mkdir(parents=True, exist_ok=True)
    ca = home / "ca.crt"
    ca.write_bytes((fed.site("site-1") / "certs" / "ca.crt").read_bytes())
    (home / "config.toml").write_text(deploy.connection_toml(address, ca))
    return {**deploy.flwr_env(), "FLWR_HOME": str(home)}


@pytest.fixture
def public(procs: Procs, tmp_path: Path) -> Federation:
    """A coordinator whose public port is on this machine's non-loopback address, with site-1
    registered and online through it."""
    own_ip = non_loopback_ipv4()
    fed = provision_loopback(tmp_path / "fed", ["site-1"], coordinator_host=own_ip, bind=own_ip)
    start_superlink(procs, fed)
    assert deploy_flwr.register(fed.env, fed.coordinator / "sites" / "site-1.pub", "site-1")
    procs.start("site-1", supernode_command(fed, "site-1"), fed.env)
    assert len(wait_online(fed.env, 1)) == 1  # the Fleet API works on the public address
    return fed


def test_ca_holder_on_the_network_cannot_register_or_unregister_nodes(
    public: Federation, procs: Procs, tmp_path: Path
) -> None:
    own_ip = deploy.load_coordinator(public.coordinator).host
    rogue = tmp_path / "rogue.pub"
    pki.write_public(rogue, pki.create_node_keypair(comment="rogue").public_openssh)
    attacker = _attacker_env(public, tmp_path / "attacker", f"{own_ip}:{public.port}")
    [site] = deploy_flwr.list_nodes(public.env)

    # TLS to the public port works (site-1 is online through it); the gateway answers 404.
    with pytest.raises(deploy_flwr.FlwrError, match="404 Not Found"):
        deploy_flwr.register(attacker, rogue, "rogue")
    with pytest.raises(deploy_flwr.FlwrError, match="404 Not Found"):
        deploy_flwr.unregister(attacker, int(site["node-id"]))
    with pytest.raises(deploy_flwr.FlwrError, match="404 Not Found"):
        deploy_flwr.list_nodes(attacker)

    after = deploy_flwr.list_nodes(public.env)  # the operator, on the coordinator's loopback
    assert [(n["node-id"], n["status"]) for n in after] == [(site["node-id"], "online")]
    assert "refused POST /v1/control/unregister-node" in procs.log("gateway")


def test_control_api_listens_on_loopback_only(public: Federation, procs: Procs) -> None:
    cfg = deploy.load_coordinator(public.coordinator)
    superlink = next(p for p in procs.procs if "flower-superlink" in p.args[0])

    listening = listening_sockets(superlink.pid)

    assert listening == {("127.0.0.1", cfg.control_port)}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((cfg.host, cfg.control_port), timeout=5).close()
