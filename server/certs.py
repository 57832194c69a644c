"""Key material for a deployment: a CA, the coordinator's TLS certificate, and one EC key pair per partner.

    python -m server.certs --out certs --host coordinator.example.org --partners ecommerce,social,video

writes (and prints the paths of):

    certs/ca.crt                  give to every partner and data scientist (they verify the coordinator with it)
    certs/ca.key                  keep on the operator's machine only
    certs/server.crt, server.key  the SuperLink's TLS certificate (SAN = --host, plus localhost/127.0.0.1)
    certs/partners/NAME.key       the partner's private key (OpenSSH format): hand it to that partner only
    certs/partners/NAME.pub       its public key: the operator registers it with the SuperLink

A partner may instead make its own key pair (``--partners`` on its machine, or ``ssh-keygen -t ecdsa -b 384``)
and send only the ``.pub`` to the operator. Existing files are never overwritten: a second call adds partners.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.files import write_atomic

VALID_DAYS = 365


def make_ca(folder: Path) -> tuple[Path, Path]:
    """ca.crt + ca.key in ``folder`` (kept if already there)."""
    crt, key = folder / "ca.crt", folder / "ca.key"
    if crt.is_file() and key.is_file():
        return crt, key
    private = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pollen federation CA")])
    cert = (_builder(name, name, private.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(private, hashes.SHA256()))
    _write_key(key, private, serialization.PrivateFormat.PKCS8)
    write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt, key


def make_server_cert(folder: Path, host: str) -> tuple[Path, Path]:
    """server.crt/server.key signed by the CA, valid for ``host`` (a DNS name or an IP) and the loopback names."""
    ca_crt, ca_key = make_ca(folder)
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    private = ec.generate_private_key(ec.SECP384R1())
    names = {host, "localhost", "127.0.0.1"}
    cert = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]), ca.subject, private.public_key())
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in sorted(names)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_private, hashes.SHA256()))
    crt, key = folder / "server.crt", folder / "server.key"
    _write_key(key, private, serialization.PrivateFormat.PKCS8)
    write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM))
    return crt, key


def make_partner_key(folder: Path, name: str) -> tuple[Path, Path]:
    """partners/NAME.key (OpenSSH private key, what flower-supernode reads) and NAME.pub (what is registered)."""
    key, pub = folder / "partners" / f"{name}.key", folder / "partners" / f"{name}.pub"
    if key.is_file() and pub.is_file():
        return key, pub
    private = ec.generate_private_key(ec.SECP384R1())
    _write_key(key, private, serialization.PrivateFormat.OpenSSH)
    write_atomic(pub, private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                        serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return key, pub


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS)))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(path: Path, private: ec.EllipticCurvePrivateKey, form: serialization.PrivateFormat) -> None:
    data = private.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())
    umask = os.umask(0o077)  # readable by the owner only, from the first byte
    try:
        write_atomic(path, data)
    finally:
        os.umask(umask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.certs", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default="certs", help="folder for the files (default: certs)")
    parser.add_argument("--host", default=None,
                        help="the coordinator's host name or IP, as partners will dial it (makes the CA and the "
                             "server certificate)")
    parser.add_argument("--partners", default="", help="comma-separated partner names: one key pair each")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    partners = [p.strip() for p in args.partners.split(",") if p.strip()]
    if not args.host and not partners:
        parser.error("nothing to do: give --host (CA + server certificate) and/or --partners")
    for name in partners:
        if not name.replace("-", "").replace("_", "").isalnum():
            parser.error(f"--partners: {name!r} is not a plain name (letters, digits, - and _)")
    if args.host:
        ca_crt, _ = make_ca(out)
        crt, key = make_server_cert(out, args.host)
        print(f"CA certificate      {ca_crt}   (give to partners and data scientists)")
        print(f"server certificate  {crt}\nserver key          {key}")
    for name in partners:
        key, pub = make_partner_key(out, name)
        print(f"partner {name}: private key {key}   public key {pub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
