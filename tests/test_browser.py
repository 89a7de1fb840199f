"""A real browser in the sandbox: headless Chromium trusts tapui's CA through the enterprise
policy tapui mounts over its policy directory, and its HTTPS exchanges are recorded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from engine.browser_trust import POLICY_DIRS, rejection_hint
from tests import servers, tls_servers
from tests.conftest import HOST, need, run_tapui

pytestmark = pytest.mark.usefixtures("sandbox")

#: Headless, without the background traffic of a first run, and resolving no name but the
#: host alias: the tests look up nothing else.
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {HOST}"]


@pytest.fixture
def https_port(pool: bytes, tmp_path: Path) -> Iterator[tuple[int, str]]:
    """An HTTPS server on the host's loopback, and the file of the CA that signed it."""
    ca = trustme.CA()
    ca_file = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with servers.running(tls_servers.https_server(ca, pool)) as port:
        yield port, str(ca_file)


def chromium_reads(url: str, ca_file: str, tmp_path: Path, *tapui_options: str,
                   env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    need("chromium")
    return run_tapui(
        "--no-ui", "--upstream-ca", ca_file, "--jsonl", str(tmp_path / "flows.jsonl"),
        *tapui_options, "--",
        *CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url,
        timeout=120, env=env,
    )


def test_chromium_trusts_tapuis_ca_and_its_exchanges_are_recorded(
    https_port: tuple[int, str], tmp_path: Path
) -> None:
    port, ca_file = https_port
    url = f"https://{HOST}:{port}/hello"
    result = chromium_reads(url, ca_file, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hello from the host" in result.stdout, result.stderr
    flows = [json.loads(line) for line in (tmp_path / "flows.jsonl").read_text().splitlines()]
    assert any(f["url"] == url and f["status"] == 200 for f in flows), flows
    assert not any(Path(d, "policies", "managed", "tapui-ca.json").exists() for d in POLICY_DIRS)


def test_chromium_ignores_the_trust_other_clients_take(
    https_port: tuple[int, str], tmp_path: Path
) -> None:
    """Why the policy: with TLS relayed untouched and SSL_CERT_FILE naming the server's CA (as
    tapui names its bundle for other clients), Chromium still rejects the certificate."""
    port, ca_file = https_port
    env = dict(os.environ, SSL_CERT_FILE=ca_file)
    result = chromium_reads(f"https://{HOST}:{port}/hello", ca_file, tmp_path, "--no-intercept",
                            env=env)
    assert "hello from the host" not in result.stdout
    assert "net_error -202" in result.stderr  # ERR_CERT_AUTHORITY_INVALID


def test_a_browser_that_rejects_tapuis_certificate_is_told_why() -> None:
    """Its flow says where the browser's trust comes from (seen with Chromium, its policy
    directory moved aside); other apps, and other alerts, get no such hint."""
    network = "/usr/lib/chromium/chromium --type=utility --utility-sub-type=network.mojom"
    assert "policy directory" in rejection_hint(network, "SSLV3_ALERT_CERTIFICATE_UNKNOWN")
    assert "own certificate store" in rejection_hint("firefox-esr --headless", "TLSV1_ALERT_UNKNOWN_CA")
    assert rejection_hint("curl -sS https://x.test/", "SSLV3_ALERT_CERTIFICATE_UNKNOWN") is None
    assert rejection_hint(network, "TLSV1_ALERT_PROTOCOL_VERSION") is None
