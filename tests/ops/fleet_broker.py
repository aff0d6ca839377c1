"""Start a real mosquitto from the shipped example config (systemd/mosquitto/edgecv.conf + edgecv.acl), with its
/etc and /var paths moved into a temp dir, a throw-away CA and broker certificate, and the two password files
(devices, operators)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.broker import Broker, free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "systemd" / "mosquitto"
PASSWORD = "s3cret-{}"  # each user's password: PASSWORD.format(user)
OPERATORS = ("workstation", "homeassistant")  # in operators.passwd; every other user is a device


def make_certs(out: Path) -> Path:
    """A CA and a broker certificate for 127.0.0.1/localhost; returns the CA file."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgecv test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (out / "ca.crt").write_bytes(ca.public_bytes(pem))
    (out / "broker.crt").write_bytes(cert.public_bytes(pem))
    (out / "broker.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                                       serialization.NoEncryption()))
    (out / "broker.key").chmod(0o600)
    return out / "ca.crt"


class FleetBroker(Broker):
    """The example broker config, verbatim except for paths and ports: `port` is the local operator listener,
    `tls_port` the device listener (client id := username), `ops_port` the TLS operator listener."""

    def __init__(self, workdir: Path, users: tuple[str, ...]) -> None:
        super().__init__(workdir)
        self.tls_port = free_port()
        self.ops_port = free_port()
        self.ca_file = make_certs(workdir / "certs")
        for name, members in (("devices", [u for u in users if u not in OPERATORS]),
                              ("operators", [u for u in users if u in OPERATORS])):
            passwd = workdir / f"{name}.passwd"
            for i, user in enumerate(members):
                flags = ["-c"] if i == 0 else []
                subprocess.run(["mosquitto_passwd", *flags, "-b", str(passwd), user, PASSWORD.format(user)],
                               check=True, capture_output=True)
        acl = workdir / "edgecv.acl"
        acl.write_text((EXAMPLE_DIR / "edgecv.acl").read_text())
        text = (EXAMPLE_DIR / "edgecv.conf").read_text()
        for old, new in (("listener 1883 127.0.0.1", f"listener {self.port} 127.0.0.1"),
                         ("listener 8883\n", f"listener {self.tls_port} 127.0.0.1\n"),
                         ("listener 8884\n", f"listener {self.ops_port} 127.0.0.1\n"),
                         ("/etc/mosquitto/certs/", f"{workdir}/certs/"),
                         ("/etc/mosquitto/", f"{workdir}/"),
                         ("/var/lib/mosquitto/", f"{workdir}/persist/")):
            assert old in text, f"example config no longer contains {old!r}: update this fixture"
            text = text.replace(old, new)  # every occurrence: both listeners name the certificates
        (workdir / "persist").mkdir(exist_ok=True)
        # Started as root, mosquitto drops to user "mosquitto", which cannot read a private temp dir.
        self.conf.write_text(text + ("\nuser root\n" if os.geteuid() == 0 else ""))

    def port_for(self, user: str) -> int:
        """Where `user` logs in: operators on the TLS operator listener, devices on the device listener."""
        return self.ops_port if user in OPERATORS else self.tls_port
