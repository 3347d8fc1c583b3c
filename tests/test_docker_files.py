"""No Docker engine runs here, so check what can be checked: every compose command parses with the real
CLI, ports and addresses agree, the bootstrap peer id is the one node1's fixed seed derives, and each node is
started exactly as the namespace testnet (bench/harness/netns.py) starts the node at the same position."""

from __future__ import annotations

from pathlib import Path

import yaml

from kvswap.cli import build_parser
from kvswap.node.p2p import peer_id_of_seed
from bench.harness.netns import node_options

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _opt(command: list[str], flag: str) -> list[str]:
    i = command.index(flag)
    out = []
    for item in command[i + 1:]:
        if item.startswith("--"):
            break
        out.append(item)
    return out


def test_every_service_command_is_a_valid_node_start():
    parser = build_parser()
    services = COMPOSE["services"]
    assert set(services) == {"node1", "node2", "node3"}
    for name, svc in services.items():
        args = parser.parse_args(svc["command"])
        assert args.func.__name__ == "cmd_start", name
        assert str(args.home) == "/data"
        host, _, port = args.node_api.rpartition(":")
        assert host == "127.0.0.1", "the control API must stay on the container's loopback"
        ip = svc["networks"]["testnet"]["ipv4_address"]
        assert args.node_listen == [f"/ip4/{ip}/tcp/4001"], "listen on the container's own address (advertised as is)"
        assert "4001" in DOCKERFILE.split("EXPOSE", 1)[1].split()[0]


def test_compose_commands_follow_the_namespace_testnet_rules():
    parser = build_parser()
    services = COMPOSE["services"]
    subnet = COMPOSE["networks"]["testnet"]["ipam"]["config"][0]["subnet"]
    boot_peer = peer_id_of_seed(bytes.fromhex(services["node1"]["environment"]["KVSWAP_IDENTITY_SEED_HEX"]))
    for index, name in enumerate(sorted(services)):
        svc = services[name]
        args = parser.parse_args(svc["command"])
        rules = node_options(index, subnet=subnet, bootstrap_peer=boot_peer)
        assert svc["networks"]["testnet"]["ipv4_address"] == rules.listen.split("/")[2], name
        assert (args.node_listen, args.node_api, tuple(args.node_bootstrap or ()), bool(args.node_accept_any)) == (
            [rules.listen], rules.api, rules.bootstrap, rules.accept_any), name


def test_bootstrap_addresses_point_at_node1_identity():
    node1 = COMPOSE["services"]["node1"]
    seed = bytes.fromhex(node1["environment"]["KVSWAP_IDENTITY_SEED_HEX"])
    ip1 = node1["networks"]["testnet"]["ipv4_address"]
    for name in ("node2", "node3"):
        (boot,) = _opt(COMPOSE["services"][name]["command"], "--bootstrap")
        assert boot == f"/ip4/{ip1}/tcp/4001/p2p/{peer_id_of_seed(seed)}"


def test_dockerfile_pins_cpu_torch_and_has_entrypoint():
    assert "torch==2.13.0" in DOCKERFILE
    assert (ROOT / "docker" / "entrypoint.sh").stat().st_mode & 0o111
    assert "KVSWAP_HOME=/data" in DOCKERFILE
