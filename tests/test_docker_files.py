"""No Docker engine runs here, so check what can be checked: every compose command parses with the real
CLI, ports and addresses agree, and the bootstrap peer id is the one node1's fixed seed derives."""

from __future__ import annotations

from pathlib import Path

import yaml

from kvswap.cli import build_parser
from kvswap.node.p2p import peer_id_of_seed

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
        host, _, port = args.api.rpartition(":")
        assert host == "127.0.0.1", "the control API must stay on the container's loopback"
        assert args.listen == ["/ip4/0.0.0.0/tcp/4001"]
        assert "4001" in DOCKERFILE.split("EXPOSE", 1)[1].split()[0]


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
