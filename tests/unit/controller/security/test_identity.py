"""Fleet identity generators: password hashes, the CA, device credentials, bundles, broker files."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

# The controller needs `cryptography`; the slim device env (agent tests only) lacks it.
pytest.importorskip("cryptography")
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from agent.protocol.config import load_config
from controller.cli.main import app
from controller.security.broker_config import (
    BrokerFiles,
    acl_text,
    secure_extra_config,
    write_broker_files,
)
from controller.security.identity import (
    CONTROLLER_USERNAME,
    FleetCA,
    FleetSecurity,
    IdentityError,
    PasswordFile,
    hash_password,
    verify_password,
)


def _mode(path: Path) -> int:
    """Permission bits of a file or directory."""
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- passwords


def test_hash_round_trip_and_format() -> None:
    encoded = hash_password("s3cret")
    assert encoded.startswith("$7$101$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret ", encoded)
    assert hash_password("s3cret") != encoded, "every hash has its own salt"


def test_verify_reads_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed (apt-get install mosquitto-clients)")
    path = tmp_path / "passwd"
    path.touch()
    subprocess.run([tool, "-b", str(path), "dev-a", "from-the-tool"], check=True)
    assert PasswordFile(path).verify("dev-a", "from-the-tool")
    assert not PasswordFile(path).verify("dev-a", "other")


def test_password_file_set_remove_and_mode(tmp_path: Path) -> None:
    passwd = PasswordFile(tmp_path / "sec" / "passwd")
    assert passwd.entries() == {}
    passwd.set("dev-a", "one")
    passwd.set("dev-b", "two")
    passwd.set("dev-a", "three")
    assert list(passwd.entries()) == ["dev-a", "dev-b"]
    assert passwd.verify("dev-a", "three") and not passwd.verify("dev-a", "one")
    assert "three" not in passwd.path.read_text(), "only hashes are stored"
    assert _mode(passwd.path) == 0o600
    assert passwd.remove("dev-a") and not passwd.remove("dev-a")
    assert list(passwd.entries()) == ["dev-b"]
    with pytest.raises(IdentityError, match="invalid broker username"):
        passwd.set("a:b", "x")
    passwd.path.write_text("garbage\n")
    with pytest.raises(IdentityError, match=":1: not a 'user:"):
        passwd.entries()


# --------------------------------------------------------------------------- CA and certificates


def test_ca_is_created_once_with_private_key_0600(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    first = ca.cert_path.read_bytes()
    assert _mode(ca.key_path) == 0o600 and _mode(tmp_path / "ca") == 0o700
    assert FleetCA.load_or_create(tmp_path / "ca").cert_path.read_bytes() == first
    cert = ca.certificate()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    ca.key_path.unlink()
    with pytest.raises(IdentityError, match="only half of the fleet CA"):
        FleetCA.load_or_create(tmp_path / "ca")


def test_issued_certificates_chain_to_the_ca(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "ca")
    client = ca.issue("dev-7", tmp_path / "c.crt", tmp_path / "c.key")
    client.verify_directly_issued_by(ca.certificate())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-7"
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(tmp_path / "c.key") == 0o600
    server = ca.issue(
        "b", tmp_path / "s.crt", tmp_path / "s.key", server_names=["b.lan", "10.0.0.2"]
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["b.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    other = FleetCA.load_or_create(tmp_path / "other")
    with pytest.raises(InvalidSignature):  # same subject name, different key
        client.verify_directly_issued_by(other.certificate())


# --------------------------------------------------------------------------- devices and bundles


def test_password_device_bundle(tmp_path: Path) -> None:
    security = FleetSecurity(tmp_path / "home")
    bundle = tmp_path / "bundle"
    creds = security.provision_device("dev-a", "password", bundle)
    path = security.write_bundle(
        creds, bundle, broker_url="mqtts://broker.lan:8883", profile="rpi4", data_dir="/srv/a"
    )
    config = load_config(path)
    assert config.device_id == "dev-a" and config.profile == "rpi4"
    assert config.username == "dev-a" and config.password == creds.password
    assert config.broker == "mqtts://broker.lan:8883" and config.data_dir == Path("/srv/a")
    assert config.ca_file == str(bundle / "ca.crt") and config.cert_file is None
    assert security.passwords.verify("dev-a", creds.password or "")
    assert _mode(bundle) == 0o700
    assert {p.name: _mode(p) for p in bundle.iterdir()} == {"agent.toml": 0o600, "ca.crt": 0o600}
    assert _mode(security.directory) == 0o700
    # Re-provisioning rotates the password: the old one stops working.
    again = security.provision_device("dev-a", "password", bundle)
    assert again.password != creds.password
    assert not security.passwords.verify("dev-a", creds.password or "")


def test_certificate_device_bundle_and_no_password(tmp_path: Path) -> None:
    security = FleetSecurity(tmp_path / "home")
    security.provision_device("dev-c", "password", tmp_path / "old")
    bundle = tmp_path / "bundle"
    creds = security.provision_device("dev-c", "cert", bundle)
    assert "dev-c" not in security.passwords.entries(), "a cert device keeps no password"
    config = load_config(
        security.write_bundle(creds, bundle, broker_url="mqtts://b:8884", profile=None)
    )
    assert config.username is None and config.password is None
    assert config.cert_file == str(bundle / "device.crt")
    assert config.key_file == str(bundle / "device.key")
    cert = x509.load_pem_x509_certificate((bundle / "device.crt").read_bytes())
    cert.verify_directly_issued_by(security.ca.certificate())
    assert not list(security.directory.glob("*device*")), "the device key lives only in the bundle"


@pytest.mark.parametrize(
    ("device_id", "auth", "message"),
    [("../x", "password", "Invalid device id"), ("d", "kerberos", "unknown auth")],
)
def test_provision_rejects(tmp_path: Path, device_id: str, auth: str, message: str) -> None:
    with pytest.raises(IdentityError, match=message):
        FleetSecurity(tmp_path).provision_device(device_id, auth, tmp_path / "b")


def test_controller_credentials_are_stable_and_not_a_device_id(tmp_path: Path) -> None:
    security = FleetSecurity(tmp_path)
    user, password = security.controller_credentials()
    assert (user, password) == security.controller_credentials()
    assert user == CONTROLLER_USERNAME and "@" in user
    assert security.passwords.verify(user, password)
    assert _mode(security.directory / "controller.secret") == 0o600


# --------------------------------------------------------------------------- broker files


def test_acl_directions() -> None:
    lines = acl_text("edgefleet/v1").splitlines()
    for channel in ("hello", "status", "events", "telemetry"):
        assert f"pattern write edgefleet/v1/devices/%u/{channel}" in lines
    for channel in ("desired", "cmd"):
        assert f"pattern read edgefleet/v1/devices/%u/{channel}" in lines
    assert "pattern read edgefleet/v1/artifacts/+/manifest" in lines
    assert "pattern read edgefleet/v1/artifacts/+/chunks/#" in lines
    assert "pattern write edgefleet/v1/artifacts/+/need" in lines
    assert lines.index(f"user {CONTROLLER_USERNAME}") + 1 == lines.index(
        "topic readwrite edgefleet/v1/#"
    )
    assert not [line for line in lines if "readwrite" in line and "%u" in line]


def test_extra_config_listeners(tmp_path: Path) -> None:
    files = BrokerFiles.at(tmp_path)
    text = secure_extra_config(files, host="0.0.0.0", tls_port=8883, cert_port=8884)
    sections = text.split("\nlistener ")
    assert len(sections) == 3
    # Device listeners bind the client id to the username (no device can kick another); the
    # loopback listener keeps client ids, so the controller's connections (replicas, an
    # operator's mosquitto_sub) never take over each other's sessions (issue 21, finding 6).
    assert "use_username_as_clientid" not in sections[0]
    for section in sections[1:]:
        assert "use_username_as_clientid true" in section
    assert "require_certificate" not in sections[1] and "keyfile" in sections[1]
    assert "require_certificate true" in sections[2]
    assert "use_identity_as_username true" in sections[2]
    no_cert = secure_extra_config(files, host="0.0.0.0", tls_port=8883, cert_port=None)
    assert "require_certificate" not in no_cert


def test_write_broker_files(tmp_path: Path) -> None:
    security = FleetSecurity(tmp_path / "home")
    security.provision_device("dev-a", "password", tmp_path / "b")
    files = write_broker_files(security, tmp_path / "out", server_names=["broker.lan"])
    conf = files.conf.read_text()
    assert "listener 1883 127.0.0.1" in conf and "listener 8883 0.0.0.0" in conf
    assert conf.rindex("allow_anonymous false") > conf.rindex("allow_anonymous true")
    assert f"password_file {files.passwd}" in conf and f"acl_file {files.acl}" in conf
    assert set(PasswordFile(files.passwd).entries()) == {"dev-a", CONTROLLER_USERNAME}
    for path in (files.passwd, files.server_key, files.conf, files.acl):
        assert _mode(path) == 0o600, path
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(security.ca.certificate())


# --------------------------------------------------------------------------- CLI


def test_cli_register_writes_bundle_and_broker_config(tmp_path: Path) -> None:
    runner = CliRunner()
    home = ["--home", str(tmp_path / "home")]
    bundle = tmp_path / "bundle"
    result = runner.invoke(
        app,
        [
            *("devices", "register", "pi-1", "--profile", "rpi4", "--bundle", str(bundle)),
            *("--json", "--broker", "mqtts://b.lan:8883", *home),
        ],
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    assert row["auth"] == "password" and row["bundle"] == str(bundle)
    assert load_config(bundle / "agent.toml").broker == "mqtts://b.lan:8883"
    result = runner.invoke(
        app, ["devices", "register", "pi-2", "--profile", "rpi4", "--auth", "cert", *home]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "bundles" / "pi-2" / "device.key").exists()
    bad = runner.invoke(app, ["devices", "register", "pi-3", "-p", "rpi4", "--auth", "x", *home])
    assert bad.exit_code == 2 and "unknown auth" in bad.output
    out = tmp_path / "broker"
    result = runner.invoke(app, ["broker", "config", "--out", str(out), "--json", *home])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["controller_username"] == CONTROLLER_USERNAME
    assert set(PasswordFile(out / "passwd").entries()) == {"pi-1", CONTROLLER_USERNAME}
