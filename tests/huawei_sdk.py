"""Shared helpers of the tests that reach the KMS over TCP: a free port, a credentials
file, and a client of the official Huawei SDK (imported unconditionally: the Makefile
installs it, and a missing SDK must fail the suite, not skip it)."""

from __future__ import annotations

import socket

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkkms.v2 import KmsClient


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sdk_client(endpoint: str, ak: str, sk: str, project: str, ca: str | None = None,
               timeout: tuple[float, float] | None = None) -> KmsClient:
    """The official SDK's KmsClient for ``endpoint`` (http://... or https://... with the
    CA file ``ca``), signing with ``ak``/``sk`` for ``project``."""
    builder = KmsClient.new_builder()
    if ca is not None or timeout is not None:
        config = HttpConfig.get_default_config()
        if timeout is not None:
            config.timeout = timeout
        if ca is not None:
            config.ssl_ca_cert = ca
        builder = builder.with_http_config(config)
    return (builder.with_credentials(BasicCredentials(ak, sk, project))
            .with_endpoints([endpoint]).build())
