"""Launch commands without starting processes: certificates, the node config string, the insecure switch."""

import ipaddress
import tomllib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from client.launch import node_config, supernode_command
from common.errors import ConfigError
from server import launch
from server.certs import make_partner_key, make_server_cert


def test_server_certificate_is_signed_by_the_ca_for_the_host(tmp_path):
    crt, _ = make_server_cert(tmp_path, "coordinator.example.org")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    key, pub = make_partner_key(tmp_path, "video")  # the formats flower-supernode and flwr supernode read
    assert load_ssh_private_key(key.read_bytes(), None).public_key() == load_ssh_public_key(pub.read_bytes())
    assert oct(key.stat().st_mode & 0o777) == "0o600"


def test_node_config_is_what_flower_parses(tmp_path):
    data = tmp_path / "my data"  # a space in the path survives Flower's parser
    data.mkdir()
    parsed = parse_config_args([node_config("video", str(data), tmp_path / "home", threads=1)])
    assert parsed == {"platform": "video", "data-path": str(data), "cache-dir": str(tmp_path / "home" / "cache"),
                      "state-dir": str(tmp_path / "home" / "state"), "export-dir": str(tmp_path / "home" / "models"),
                      "threads": 1}
    with pytest.raises(FileNotFoundError, match="--data-path .*missing: no such folder"):
        node_config("video", str(tmp_path / "missing"), tmp_path)


def test_insecure_only_when_asked_and_with_a_warning(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="CA certificate"):
        supernode_command("h:1", "video", None, tmp_path, tmp_path / "ca.crt", tmp_path / "video.key")
    assert "--insecure" in supernode_command("h:1", "video", None, tmp_path, None, None)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    assert launch.main(["connect", "--address", "127.0.0.1:9092", "--insecure", "--name", "trial"]) == 0
    assert "WARNING: --insecure" in capsys.readouterr().err
    config = tomllib.loads((tmp_path / "flwr" / "config.toml").read_text())
    assert config["superlink"]["trial"] == {"address": "127.0.0.1:9092", "insecure": True}
    with pytest.raises(ConfigError, match="CA certificate"):  # a user's mistake: one line, exit 2 (common/cli.py)
        launch.main(["connect", "--address", "127.0.0.1:9092", "--ca", str(tmp_path / "none.crt")])
