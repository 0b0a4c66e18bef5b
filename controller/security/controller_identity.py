"""How the controller logs in to an external broker: its identity from HOME/security.

`edgefleet broker config` creates the controller user (`ctl@edgefleet`, password in
`controller.secret`) and signs the broker's certificate with the fleet CA, so `edgefleet up
--broker URL` from the same data dir finds everything it needs there: the password, the CA for
`mqtts://`, and a client certificate when one was issued (`controller.crt`/`controller.key`).
Credentials inside the URL are refused: a URL is echoed in logs, errors and serving.json, a
secret must not be. Reads files only; needs no `cryptography`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["ControllerIdentity", "controller_identity", "redact_broker_url"]

# The controller's broker username (identity.CONTROLLER_USERNAME; repeated here because that
# module needs `cryptography` at import time).
CONTROLLER_USERNAME = "ctl@edgefleet"
CONTROLLER_SECRET = "controller.secret"
CONTROLLER_CERT, CONTROLLER_KEY = "controller.crt", "controller.key"


@dataclass(frozen=True)
class ControllerIdentity:
    """What the controller presents to the broker (all None: anonymous, the loopback default)."""

    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def describe(self) -> str:
        """One log-safe line: who and how, never the secret."""
        who = f"as {self.username}" if self.username else "anonymously"
        how = [
            label
            for label, value in (
                ("with the fleet CA", self.ca_file),
                ("with a client certificate", self.cert_file),
            )
            if value
        ]
        return " ".join([who, *how])


def redact_broker_url(url: str) -> str:
    """The URL with any user:password@ replaced by ***@ (for error messages)."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


def controller_identity(home: Path, broker_url: str) -> ControllerIdentity:
    """The controller's identity for `broker_url`, from HOME/security; ValueError for a URL
    carrying credentials (named redacted) or a half-present client certificate."""
    if "@" in urlsplit(broker_url if "://" in broker_url else f"mqtt://{broker_url}").netloc:
        raise ValueError(
            f"broker URL {redact_broker_url(broker_url)} carries credentials: not supported "
            "(a URL ends up in logs); the controller logs in as "
            f"{CONTROLLER_USERNAME} with HOME/security/{CONTROLLER_SECRET}, written by "
            "`edgefleet broker config` in the same data dir"
        )
    security = home / "security"
    username = password = None
    secret = security / CONTROLLER_SECRET
    if secret.is_file():
        username, password = CONTROLLER_USERNAME, secret.read_text().strip()
    scheme = broker_url.split("://", 1)[0].lower() if "://" in broker_url else "mqtt"
    tls = scheme in ("mqtts", "ssl")
    ca = security / "ca.crt"
    ca_file = str(ca) if tls and ca.is_file() else None
    cert, key = security / CONTROLLER_CERT, security / CONTROLLER_KEY
    if cert.is_file() != key.is_file():
        raise ValueError(f"{security}: {CONTROLLER_CERT} and {CONTROLLER_KEY} go together")
    with_cert = tls and cert.is_file()
    return ControllerIdentity(
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=str(cert) if with_cert else None,
        key_file=str(key) if with_cert else None,
    )
