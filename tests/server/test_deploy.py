"""Startup kits and the Flower command lines built from them, checked with Flower's own parsers."""

from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from client.training.site_policy import SitePolicy
from common.cli import main
from common.crypto import pki
from common.errors import ConfigError
from server import deploy, deploy_flwr, deploy_kitsign, deploy_provision, deploy_publisher

SITES = ("site-1", "site-2")


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    plan = deploy_provision.ProvisionPlan(
        out=tmp_path / "kits", coordinator_host="fl.example.org", sites=SITES, port=9443
    )
    deploy_provision.provision(plan)
    return tmp_path / "kits"


def _resign(kits: Path, kit: str) -> None:
    """Sign a kit again with its provisioning key (as `init`, `add-site`, `rotate-cert` do)."""
    key = deploy_publisher.load_signing_key(deploy_kitsign.default_key_path(kits))
    path = kits / "coordinator" if kit == "coordinator" else kits / "sites" / kit
    deploy_kitsign.sign_kit(path, key, name=kit)


def _all_files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_private_key_in_every_kit_is_0600(kits: Path) -> None:
    keys = [p for p in kits.rglob("*.key")]

    assert len(keys) == 4 + len(SITES)  # CA, server, app publisher, kit signer, one per site
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in keys)


def test_site_kits_hold_only_their_own_private_key(kits: Path) -> None:
    site1 = {
        p.relative_to(kits / "sites" / "site-1") for p in (kits / "sites" / "site-1").rglob("*")
    }

    assert Path("keys/supernode.key") in site1
    assert not any(p.name in ("ca.key", "server.key") for p in site1)


def test_coordinator_holds_the_public_half_of_each_site_key(kits: Path) -> None:
    for site in SITES:
        private = load_ssh_private_key(
            (kits / "sites" / site / "keys" / "supernode.key").read_bytes(), None
        )
        public = load_ssh_public_key((kits / "coordinator" / "sites" / f"{site}.pub").read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()  # type: ignore[union-attr]


def test_rerunning_init_refuses_and_changes_nothing(kits: Path) -> None:
    before = _all_files(kits)
    plan = deploy_provision.ProvisionPlan(out=kits, coordinator_host="fl.example.org", sites=SITES)

    with pytest.raises(ConfigError, match="never overwrites keys silently"):
        deploy_provision.provision(plan)
    assert _all_files(kits) == before


def test_forced_reinit_replaces_keys_keeps_no_clear_copy_and_denies_the_old_ones(
    kits: Path,
) -> None:
    old = (kits / "sites" / "site-1" / "keys" / "supernode.key").read_bytes()
    old_pub = (kits / "coordinator" / "sites" / "site-1.pub").read_bytes()
    plan = deploy_provision.ProvisionPlan(
        out=kits, coordinator_host="fl.example.org", sites=SITES, force=True
    )

    deploy_provision.provision(plan)

    assert (kits / "sites" / "site-1" / "keys" / "supernode.key").read_bytes() != old
    assert not any(old in data for data in _all_files(kits.parent).values())
    denied = deploy_provision.deny_list(kits / "coordinator")
    assert pki.key_fingerprint(old_pub) in denied


def test_superlink_command_is_tls_node_auth_offline_and_persistent(kits: Path) -> None:
    coord = kits / "coordinator"
    cmd = deploy.superlink_command(coord, deploy.load_coordinator(coord))

    args = _parse_args_run_superlink().parse_args(cmd[1:])

    assert not args.insecure
    assert args.enable_supernode_auth
    assert args.runtime_dependency_install is False
    assert args.database == str((coord / "state" / "superlink.db").resolve())
    assert (args.host, args.port) == ("127.0.0.1", deploy.DEFAULT_CONTROL_PORT)  # loopback only
    assert all(
        Path(f).is_file() for f in (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
    )


def test_supernode_command_carries_tls_key_and_typed_node_config(kits: Path) -> None:
    site = kits / "sites" / "site-2"
    cfg = deploy.load_site(site)

    args = _parse_args_run_supernode().parse_args(deploy.supernode_command(site, cfg)[1:])

    assert not args.insecure and not args.runtime_dependency_install
    assert args.superlink == "fl.example.org:9443"
    assert Path(args.root_certificates).read_bytes() == (kits / "ca" / "ca.crt").read_bytes()
    assert Path(args.auth_supernode_private_key).name == "supernode.key"
    assert parse_config_args([args.node_config]) == {
        "data-dir": "/srv/facefed/data",
        "site-id": "site-2",
        "max-epsilon": 8.0,
        "state-dir": str((site / "state").resolve()),  # the privacy history survives a reboot
        # the site's own policy ([policy] in site.toml), which no run config can override
        **{f"policy-{k}": v for k, v in SitePolicy(max_epsilon_run=8.0).to_mapping().items()},
    }


def test_the_kit_policy_reaches_the_site_and_a_stricter_one_is_kept(kits: Path) -> None:
    site = kits / "sites" / "site-2"
    text = (site / "site.toml").read_text()
    assert "[policy]" in text and "require-dp = true" in text
    (site / "site.toml").write_text(
        text.replace("max-delta = 1e-05", "max-delta = 1e-06").replace(
            "min-noise-multiplier = 0.0", "min-noise-multiplier = 1.5"
        )
    )

    node = parse_config_args([deploy.format_node_config(deploy.load_site(site).node_config())])
    policy = SitePolicy.from_node_config(node)

    assert policy.max_delta == 1e-6 and policy.min_noise_multiplier == 1.5
    assert policy.max_epsilon_run == 8.0 and policy.require_dp


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max-delta = 2.0", "max-delta must be in (0, 1)"),
        ("secret = true", "unknown policy key 'secret'"),
        ("max-epsilon-lifetime = 4.0", "max-epsilon-lifetime (4) is below"),
    ],
)
def test_a_bad_kit_policy_is_one_line_naming_the_file_and_setting(
    kits: Path, line: str, message: str
) -> None:
    path = kits / "sites" / "site-2" / "site.toml"
    path.write_text(path.read_text() + line + "\n")
    if line.startswith(("max-delta", "max-epsilon-lifetime")):  # replace, not repeat, the key
        key = line.split(" ")[0]
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(key + " ")]
        path.write_text("\n".join([*lines, line]) + "\n")
    with pytest.raises(ConfigError) as caught:
        deploy.load_site(path.parent)
    assert message in str(caught.value) and "site.toml [policy]" in str(caught.value)


@pytest.mark.parametrize(
    "path", ["/srv/data with spaces", r"C:\data\faces", '/srv/"quoted"', "/srv/ünïcode"]
)
def test_node_config_paths_survive_flowers_parser(path: str) -> None:
    values: dict[str, str | float] = {"data-dir": path, "site-id": "007", "max-epsilon": 3.0}

    parsed = parse_config_args([deploy.format_node_config(values)])

    assert parsed == values
    assert isinstance(parsed["site-id"], str) and isinstance(parsed["max-epsilon"], float)


def test_node_config_value_flower_cannot_carry_is_rejected() -> None:
    with pytest.raises(ConfigError, match="single quote"):
        deploy.format_node_config({"data-dir": "/srv/o'brien"})


@pytest.mark.parametrize("epsilon", ["0.0", "-1.0", "inf", "nan"])
def test_site_toml_with_unusable_budget_is_rejected(kits: Path, epsilon: str) -> None:
    site_toml = kits / "sites" / "site-1" / "site.toml"
    text = site_toml.read_text().replace("max-epsilon = 8.0", f"max-epsilon = {epsilon}")
    site_toml.write_text(text)

    with pytest.raises(ConfigError, match="max-epsilon"):
        deploy.load_site(kits / "sites" / "site-1")


def test_site_toml_with_unknown_key_is_rejected(kits: Path) -> None:
    site_toml = kits / "sites" / "site-1" / "site.toml"
    site_toml.write_text(site_toml.read_text() + "dta-dir = '/typo'\n")

    with pytest.raises(ConfigError, match="dta-dir"):
        deploy.load_site(kits / "sites" / "site-1")


def test_flwr_cli_reads_the_kit_connection(kits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    coord = kits / "coordinator"
    deploy.write_connection(coord, deploy.load_coordinator(coord))  # every `deploy` command does
    monkeypatch.setenv("FLWR_HOME", deploy.flwr_env(coord)["FLWR_HOME"])

    conn = read_superlink_connection(None)

    assert conn.name == deploy.CONNECTION
    assert (
        conn.address == f"127.0.0.1:{deploy.DEFAULT_CONTROL_PORT}"
    )  # loopback, not the public port
    assert conn.root_certificates == str((coord / "certs" / "ca.crt").resolve())
    assert not conn.insecure


def test_add_site_and_rotate_keep_the_ca(kits: Path) -> None:
    ca_before = (kits / "ca" / "ca.crt").read_bytes()
    server_before = (kits / "coordinator" / "certs" / "server.crt").read_bytes()

    deploy_provision.add_site(kits, "clinic-3", max_epsilon=2.0, data_dir="/d")
    deploy_provision.rotate_server_cert(kits)

    assert set(deploy.load_coordinator(kits / "coordinator").sites) == {*SITES, "clinic-3"}
    assert deploy.load_site(kits / "sites" / "clinic-3").max_epsilon == 2.0
    assert (kits / "sites" / "clinic-3" / "certs" / "ca.crt").read_bytes() == ca_before
    assert (kits / "coordinator" / "certs" / "server.crt").read_bytes() != server_before
    assert not list((kits / "coordinator" / "certs").glob("server.key.*"))


def test_cli_init_then_rerun_fails_with_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "deploy",
        "init",
        "--sites",
        "2",
        "--coordinator",
        "10.1.2.3",
        "--out",
        str(tmp_path / "k"),
    ]

    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("facefed: error:") and "--force" in err[0]


def test_cli_site_refuses_to_start_without_its_data_dir(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "site", "--kit", str(kits / "sites" / "site-1")]) == 2

    assert "data-dir /srv/facefed/data" in capsys.readouterr().err


def test_cli_rejects_bad_site_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "deploy",
        "init",
        "--site-names",
        "ok,../etc",
        "--coordinator",
        "h",
        "--out",
        str(tmp_path),
    ]

    assert main(argv) == 2
    assert "site id '../etc'" in capsys.readouterr().err


def test_demo_partitions_reach_node_config_as_ints(tmp_path: Path) -> None:
    plan = deploy_provision.ProvisionPlan(
        out=tmp_path, coordinator_host="127.0.0.1", sites=SITES, partitions=True
    )
    deploy_provision.provision(plan)
    site = tmp_path / "sites" / "site-2"

    args = _parse_args_run_supernode().parse_args(
        deploy.supernode_command(site, deploy.load_site(site))[1:]
    )

    parsed = parse_config_args([args.node_config])
    assert (parsed["partition-id"], parsed["num-partitions"]) == (1, 2)


# --- the trusted publisher and the loopback Control API -------------------------------------------


def _trusted_by_flower(path: Path) -> dict[str, str]:
    """The trusted entities exactly as ``flower-supernode --trusted-entities`` loads and checks them."""
    from flwr.supernode.cli.flower_supernode import (
        _try_obtain_trusted_entities,
        _validate_public_keys_ed25519,
    )

    entities = _try_obtain_trusted_entities(path)
    assert entities
    _validate_public_keys_ed25519(entities)
    return entities


def test_every_site_kit_trusts_exactly_the_provisioned_publisher(kits: Path) -> None:
    publisher = load_ssh_private_key((kits / "publisher" / "publisher.key").read_bytes(), None)
    expected_id = deploy_publisher.key_id(publisher.public_key())  # type: ignore[arg-type]

    for site in SITES:
        entities = _trusted_by_flower(kits / "sites" / site / "trusted-entities.yaml")

        assert list(entities) == [expected_id]
        trusted = load_ssh_public_key(entities[expected_id].encode())
        assert trusted.public_bytes_raw() == publisher.public_key().public_bytes_raw()  # type: ignore[union-attr]
    assert stat.S_IMODE((kits / "publisher" / "publisher.key").stat().st_mode) == 0o600
    assert not list((kits / "sites").rglob("publisher.key"))  # sites hold only the public half


def test_site_start_script_runs_the_supernode_with_trusted_entities(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = kits / "sites" / "site-1"
    script = (site / "start-site.sh").read_text()

    assert main(["deploy", "site", "--kit", str(site), "--print-command"]) == 0
    args = _parse_args_run_supernode().parse_args(shlex.split(capsys.readouterr().out)[1:])

    assert 'deploy site --kit "$KIT"' in script  # the script runs exactly this command
    assert args.trusted_entities == (site / "trusted-entities.yaml").resolve()
    assert _trusted_by_flower(args.trusted_entities)


def test_coordinator_serves_control_api_on_loopback_and_only_the_gateway_publicly(
    kits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = kits / "coordinator"
    cfg = deploy.load_coordinator(coord)

    assert main(["deploy", "coordinator", "--kit", str(coord), "--print-command"]) == 0
    superlink, gateway = (shlex.split(line) for line in capsys.readouterr().out.splitlines())
    args = _parse_args_run_superlink().parse_args(superlink[1:])
    env = deploy.superlink_env(coord, cfg)

    assert (args.host, args.port) == ("127.0.0.1", cfg.control_port)
    assert gateway[-4:] == ["deploy", "gateway", "--kit", str(coord.resolve())]
    assert (cfg.bind, cfg.port) == ("0.0.0.0", 9443)  # what the gateway serves: Fleet API only
    assert env["FLWR_SUPERGRID_API_URL"] == f"http://127.0.0.1:{cfg.hub_port}/v1"
    assert env["FLWR_INTERNAL_GRPC_CONTROL_API"] == "0"  # no legacy gRPC Control API on 0.0.0.0
    assert "control-port = 9091" in (coord / "coordinator.toml").read_text()


def test_ports_of_the_coordinator_must_differ(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="three different ports"):
        deploy_provision.ProvisionPlan(
            out=tmp_path, coordinator_host="h", sites=SITES, port=9091, control_port=9091
        )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "not found"),
        ("", "names no trusted publisher"),
        ("{}\n", "names no trusted publisher"),
        ("fpk_x: 'ecdsa-sha2-nistp256 AAAA'\n", "not an OpenSSH public key"),
        ("[unclosed\n", "not valid YAML"),
    ],
)
def test_site_without_a_trusted_publisher_refuses_to_start(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, reason: str
) -> None:
    site = kits / "sites" / "site-1"
    trusted = site / "trusted-entities.yaml"
    trusted.unlink()
    if content is not None:
        trusted.write_text(content)
    _resign(kits, "site-1")  # a kit signed so by its provisioner: the site check still refuses it

    code = main(["deploy", "site", "--kit", str(site), "--data-dir", str(tmp_path)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and reason in err[0]


def test_init_with_a_given_publisher_key_trusts_it_and_holds_no_private_key(tmp_path: Path) -> None:
    keys = pki.create_publisher_keypair("release-manager")
    (tmp_path / "rm.pub").write_bytes(keys.public_openssh)
    plan = deploy_provision.ProvisionPlan(
        out=tmp_path / "kits", coordinator_host="h", sites=SITES, publisher_pub=tmp_path / "rm.pub"
    )

    deploy_provision.provision(plan)

    given = load_ssh_public_key(keys.public_openssh)
    entities = _trusted_by_flower(tmp_path / "kits" / "sites" / "site-2" / "trusted-entities.yaml")
    assert list(entities) == [deploy_publisher.key_id(given)]  # type: ignore[arg-type]
    assert not (tmp_path / "kits" / "publisher" / "publisher.key").exists()


def test_added_site_trusts_the_same_publisher(kits: Path) -> None:
    deploy_provision.add_site(kits, "clinic-3", max_epsilon=2.0, data_dir="/d")

    assert _trusted_by_flower(kits / "sites" / "clinic-3" / "trusted-entities.yaml") == (
        _trusted_by_flower(kits / "sites" / "site-1" / "trusted-entities.yaml")
    )


def test_submit_refuses_to_sign_with_a_key_the_sites_do_not_trust(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rogue = tmp_path / "rogue.key"
    pki.write_secret(rogue, pki.create_publisher_keypair().private_openssh)
    argv = ["deploy", "submit", "--kit", str(kits / "coordinator"), "--publisher-key", str(rogue)]

    code = main(argv)

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not the publisher the sites trust" in err[0]


def test_submit_without_the_publisher_key_is_one_clear_error(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "submit", "--kit", str(kits / "coordinator")]
    argv += ["--publisher-key", str(tmp_path / "missing.key")]

    code = main(argv)

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--publisher-key" in err[0]


# --- where a run reads its evaluation data and writes its results --------------------------------


def _fake_submit(
    monkeypatch: pytest.MonkeyPatch, status: str = "finished:completed"
) -> list[list[str]]:
    """Stand-ins for the bundle build and the `flwr` calls; the run configs submitted."""
    seen: list[list[str]] = []

    class _Fab:
        app_spec, key_id = "@facefed/facefed==0.0.0", "fpk_test"

    def fake_submit(env: object, fab: object, *, hub_port: int, run_config: list[str]) -> int:
        seen.append(list(run_config))
        return 7

    monkeypatch.setattr(deploy_publisher, "build_signed_fab", lambda app, key: _Fab())
    monkeypatch.setattr(deploy_flwr, "submit", fake_submit)
    monkeypatch.setattr(
        deploy_flwr, "wait_for_run", lambda env, run, timeout, **_kw: {"status": status}
    )
    return seen


def _registered(coord: Path, *sites: str) -> None:
    """Mark sites registered, as `deploy register` does (sites/<site>.node-id)."""
    for number, site in enumerate(sites, start=101):
        (coord / "sites" / f"{site}.node-id").write_text(f"{number}\n")


def test_coordinator_kit_names_its_evaluation_data_and_an_out_dir_inside_the_kit(
    kits: Path,
) -> None:
    cfg = deploy.load_coordinator(kits / "coordinator")

    where = cfg.run_locations(kits / "coordinator")

    assert cfg.data_dir == "/srv/facefed/data"  # init --data-dir, unless --coordinator-data-dir
    assert where["out-dir"] == str((kits / "coordinator" / "runs" / "default").resolve())
    assert (kits / "coordinator" / "runs").is_dir()


def test_submit_passes_the_kit_data_and_out_dirs_whatever_the_shell_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "eval-data"
    data.mkdir()
    argv = ["deploy", "init", "--sites", "2", "--coordinator", "h", "--out", str(tmp_path / "k")]
    assert main([*argv, "--data-dir", "/srv/site-data", "--coordinator-data-dir", str(data)]) == 0
    seen = _fake_submit(monkeypatch)
    _registered(tmp_path / "k" / "coordinator", "site-1", "site-2")
    monkeypatch.chdir(tmp_path)  # the shell's folder must not matter
    run = ["--run-config", "num-rounds=2 num-sites=2 cohort-size=2"]

    code = main(["deploy", "submit", "--kit", "k/coordinator", *run])

    assert code == 0
    config = parse_config_args(seen[0])
    assert config["num-rounds"] == 2 and config["data-dir"] == str(data)
    assert config["out-dir"] == str(tmp_path / "k" / "coordinator" / "runs" / "default")


def test_submit_keeps_the_operators_out_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["deploy", "init", "--sites", "1", "--coordinator", "h", "--out", str(tmp_path / "k")]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 0
    seen = _fake_submit(monkeypatch)
    _registered(tmp_path / "k" / "coordinator", "site-1")
    run = ["--run-config", f'num-sites=1 cohort-size=1 out-dir="{tmp_path / "run-9"}"']

    assert main(["deploy", "submit", "--kit", str(tmp_path / "k" / "coordinator"), *run]) == 0

    config = parse_config_args(seen[0])
    assert config["out-dir"] == str(tmp_path / "run-9") and config["data-dir"] == str(tmp_path)


def test_submit_without_the_coordinators_evaluation_data_is_one_line(
    kits: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = _fake_submit(monkeypatch)
    _registered(kits / "coordinator", *SITES)
    run = ["--run-config", "num-sites=2 cohort-size=2"]

    code = main(["deploy", "submit", "--kit", str(kits / "coordinator"), *run])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "/srv/facefed/data does not exist" in err[0]
    assert "coordinator.toml" in err[0] and seen == []


def test_submit_refuses_a_run_asking_for_more_sites_than_registered_and_not_revoked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "init", "--sites", "3", "--coordinator", "h", "--out", str(tmp_path / "k")]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 0
    coord = tmp_path / "k" / "coordinator"
    _registered(coord, "site-1", "site-2", "site-3")
    (coord / "sites" / "site-3.revoked").write_text("revoked\n")
    seen = _fake_submit(monkeypatch)
    capsys.readouterr()

    code = main(["deploy", "submit", "--kit", str(coord), "--run-config", "num-sites=3"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and seen == []
    assert "num-sites = 3 but 2 site(s) are registered and not revoked (site-1, site-2)" in err[0]


def test_nodes_names_each_sites_node_and_when_it_was_last_seen(
    kits: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = kits / "coordinator"
    _registered(coord, "site-1", "site-2")
    (coord / "sites" / "site-2.revoked").write_text("revoked\n")
    nodes = [
        {"node-id": "101", "status": "online", "online-at": "2026-12-01 10:00:00Z"},
        {"node-id": "102", "status": "offline", "offline-at": "2026-12-01 09:00:00Z"},
        {"node-id": "555", "status": "registered"},
    ]
    monkeypatch.setattr(deploy_flwr, "list_nodes", lambda env: nodes)

    assert main(["deploy", "nodes", "--kit", str(coord)]) == 0

    rows = {row["node-id"]: row for row in json.loads(capsys.readouterr().out)}
    assert (rows["101"]["site"], rows["101"]["last-seen"]) == ("site-1", "now")
    assert (rows["102"]["site"], rows["102"]["last-seen"]) == ("site-2", "2026-12-01 09:00:00Z")
    assert rows["555"]["site"] is None and rows["555"]["last-seen"] == "never"


def test_revoke_help_says_site_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy", "revoke", "--help"]) == 0

    text = " ".join(capsys.readouterr().out.split())
    assert "--site SITE site id (repeatable; required)" in text and "default: all" not in text
