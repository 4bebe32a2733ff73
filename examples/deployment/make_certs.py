"""Make a local test CA, a SuperLink TLS certificate and one SuperNode key pair per hospital.

For trying a deployment on one machine or a private network, not for production:
the CA's private key sits next to the certificates it signs. A hospital network
should use its own PKI for the SuperLink's certificate and let each hospital
generate its own key pair (only the public key is ever handed to the coordinator).

Usage::

    python examples/deployment/make_certs.py OUT --hospitals north south east [--host superlink.example.org]

Writes, under ``OUT``:

- ``certificates/ca.crt``: the CA certificate every SuperNode (``--root-certificates``)
  and the ``flwr`` CLI (``root-certificates`` in its config) trust;
  ``certificates/ca.key`` its private key;
- ``certificates/server.pem`` and ``certificates/server.key``: the SuperLink's certificate
  (valid for ``localhost``, ``127.0.0.1`` and every ``--host``) and private key;
- ``keys/<hospital>`` and ``keys/<hospital>.pub``: an ECDSA P-384 key pair in OpenSSH
  format per hospital, for ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(folder: Path, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Write a self-signed CA certificate and key to ``folder``; return both.

    Parameters
    ----------
    folder : Path
        Where ``ca.crt`` and ``ca.key`` go.
    now : datetime.datetime
        Start of the validity period (UTC).

    Returns
    -------
    tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
        The CA certificate and its private key.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedfm test CA"))
        .issuer_name(_name("fedfm test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(folder / "ca.key", _pem_key(key), private=True)
    return cert, key


def make_server_certificate(
    folder: Path,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    hosts: Sequence[str],
    now: datetime.datetime,
) -> None:
    """Write the SuperLink's certificate (``server.pem``) and key (``server.key``), signed by the CA.

    Parameters
    ----------
    folder : Path
        Where the files go.
    ca : tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
        The CA certificate and key from :func:`make_ca`.
    hosts : Sequence[str]
        Extra host names or IP addresses the SuperLink is reached at.
    now : datetime.datetime
        Start of the validity period (UTC).
    """
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(folder / "server.key", _pem_key(key), private=True)


def make_node_keys(folder: Path, hospital: str) -> Path:
    """Write an ECDSA P-384 key pair in OpenSSH format: ``<hospital>`` and ``<hospital>.pub``.

    Parameters
    ----------
    folder : Path
        Where the two files go.
    hospital : str
        The hospital's name (letters, digits, ``_``, ``.``, ``-``).

    Returns
    -------
    Path
        The public key file.
    """
    if not _NAME.match(hospital):
        raise SystemExit(f"hospital names may hold letters, digits, '_', '.' and '-' only, got {hospital!r}")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(folder / hospital, private, private=True)
    _write(folder / f"{hospital}.pub", public + f" {hospital}\n".encode(), private=False)
    return folder / f"{hospital}.pub"


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write certificates/ and keys/ into")
    parser.add_argument("--hospitals", nargs="+", required=True, help="one key pair per hospital name")
    parser.add_argument("--host", action="append", default=[],
                        help="a host name or IP the SuperLink is reached at (besides localhost and 127.0.0.1)")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    certificates = args.out / "certificates"
    ca = make_ca(certificates, now)
    make_server_certificate(certificates, ca, args.host, now)
    for hospital in args.hospitals:
        make_node_keys(args.out / "keys", hospital)
    print(f"CA and SuperLink certificate in {certificates}; keys of {', '.join(args.hospitals)} in {args.out / 'keys'}")


if __name__ == "__main__":
    main()
