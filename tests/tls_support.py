"""A throwaway PKI and a mosquitto with a TLS listener, client certificates, passwords and an ACL.

Test support only: the certificates are made with `cryptography` in a temp dir for each session.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # common name -> (cert, key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path, mode: int = 0o600) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(mode)


def make_pki(directory: Path, clients: list[str]) -> Pki:
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("edge-slm test CA")).issuer_name(_name("edge-slm test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(cn: str, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        cpath, kpath = directory / f"{cn}.crt", directory / f"{cn}.key"
        cpath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        # mosquitto started as root drops to user "mosquitto" before reading its key
        _write_key(key, kpath, 0o644 if server else 0o600)
        return cpath, kpath

    server_cert, server_key = issue("localhost", server=True)
    return Pki(directory / "ca.pem", server_cert, server_key, {cn: issue(cn, server=False) for cn in clients})


def secure_mosquitto_conf(directory: Path, tls_port: int, password_port: int, pki: Pki,
                          users: dict[str, str]) -> Path:
    """TLS listener: client certificate required, CN is the username. Password listener on loopback.
    ACL: each user may read and write only edge-slm/<its name>/# (and read homeassistant/status);
    the user "admin" may read everything."""
    passwd = directory / "passwd"
    passwd.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    acl = directory / "acl"
    acl.write_text("user admin\ntopic read #\n\npattern readwrite edge-slm/%u/#\npattern read homeassistant/status\n")
    conf = directory / "mosquitto-secure.conf"
    # as root, mosquitto drops to user "mosquitto", which cannot enter pytest's 0700 temp dirs
    conf.write_text(
        ("user root\n" if os.geteuid() == 0 else "")
        + "per_listener_settings false\nallow_anonymous false\nmax_queued_messages 0\nset_tcp_nodelay true\n"
        f"persistence false\nlog_dest stdout\npassword_file {passwd}\nacl_file {acl}\n"
        f"listener {tls_port} 127.0.0.1\ncafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        f"listener {password_port} 127.0.0.1\n")
    return conf
