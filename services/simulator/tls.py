"""TLS toward the ingestion service (its ``GRPC_TLS_CERT_FILE`` / ``GRPC_TLS_KEY_FILE``, optionally
mutual TLS with ``GRPC_TLS_CLIENT_CA_FILE``), for ``eta-simulator live``.

* ``ca_file`` — PEM of the CA that signed the server's certificate (empty: the system's trusted roots);
* ``cert_file`` / ``key_file`` — the client's certificate and key, for mutual TLS;
* ``server_name`` — the name the server's certificate must carry when it is not the target's host
  (e.g. connecting by IP to a certificate for ``ingestion.example``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["ClientTls", "ingestion_channel"]


@dataclass(frozen=True)
class ClientTls:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs its key (and the key its certificate)")

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files (read now: a missing file fails here, not at the first call)."""

        def read(path: str) -> bytes | None:
            if not path:
                return None
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise ValueError(f"cannot read TLS file {path}: {exc.strerror or exc}") from exc

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def ingestion_channel(
    target: str, tls: ClientTls | None, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()
) -> grpc.aio.Channel:
    """A channel to ``target``: TLS when ``tls`` is given, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(target, interceptors=list(interceptors))
    return grpc.aio.secure_channel(
        target, tls.credentials(), options=tls.options(), interceptors=list(interceptors)
    )
