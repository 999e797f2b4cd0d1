"""Certificates for the TLS tests, made with the openssl command line in the test's own
directory: a CA, and leaf certificates it signs for 127.0.0.1 / localhost (server and client
use both), so no test depends on a certificate shipped with the repository."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

SAN = "subjectAltName=DNS:localhost,IP:127.0.0.1"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def need_openssl() -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")


def make_ca(d: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = d / f"{name}-ca.pem", d / f"{name}-ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
             "-out", str(cert), "-subj", f"/CN={name} test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(d: pathlib.Path, name: str, ca: tuple[pathlib.Path, pathlib.Path]
              ) -> tuple[pathlib.Path, pathlib.Path]:
    """A certificate for 127.0.0.1 and localhost signed by ``ca``, good for a server and for a
    client: (certificate, key)."""
    cert, key, csr = d / f"{name}.pem", d / f"{name}.key", d / f"{name}.csr"
    ext = d / f"{name}.ext"
    ext.write_text(f"{SAN}\nextendedKeyUsage=serverAuth,clientAuth\n"
                   "basicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "1", "-out", str(cert), "-extfile", str(ext))
    return cert, key
