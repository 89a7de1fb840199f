"""Chrome and Chromium trust tapui's CA through an enterprise policy.

They verify certificates against their own root store and ignore the system bundle and
SSL_CERT_FILE; on Linux, what they add to it comes from the `CACertificates` policy (Chrome
131 and later), read from JSON files in `<policy dir>/policies/managed`. For each browser whose
policy directory exists, a copy of that directory with tapui's CA added to the policy is
mounted over it inside the sandbox. A browser with no directory of its own in /etc (tapui
cannot make one there without privileges) goes without.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

#: The policy directories of the Chromium family: Chromium (Debian, Fedora, Arch, and the
#: builds Playwright downloads), Ubuntu's old chromium-browser, Google Chrome, and Chrome
#: for Testing (Puppeteer's).
POLICY_DIRS = ["/etc/chromium", "/etc/chromium-browser", "/etc/opt/chrome",
               "/etc/opt/chrome_for_testing"]
POLICY = "CACertificates"
POLICY_FILE = "tapui-ca.json"


def policy_mounts(ca_der: bytes, workdir: Path, dirs: list[str]) -> list[tuple[str, str]]:
    """(copy, original) for each of `dirs` (existing policy directories): the copy has tapui's
    CA in a managed policy. A directory that cannot be copied is left as it is."""
    cert = base64.b64encode(ca_der).decode()
    mounts = []
    for number, original in enumerate(dirs):
        copy = workdir / f"browser-policy-{number}"
        try:
            shutil.copytree(original, copy, symlinks=True)
            managed = copy / "policies" / "managed"
            managed.mkdir(parents=True, exist_ok=True)
            _add_certificate(managed, cert)
        except (OSError, shutil.Error):
            shutil.rmtree(copy, ignore_errors=True)
            continue
        mounts.append((str(copy), original))
    return mounts


def _add_certificate(managed: Path, cert: str) -> None:
    """Add `cert` to the CACertificates policy: in the file that already sets it (two files
    setting one policy conflict), else in a file of its own."""
    for path in sorted(managed.glob("*.json")):
        try:
            policies = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(policies, dict) and isinstance(policies.get(POLICY), list):
            policies[POLICY].append(cert)
            path.unlink()  # (a symbolic link, maybe: the copy gets a file of its own)
            path.write_text(json.dumps(policies, indent=2))
            return
    (managed / POLICY_FILE).write_text(json.dumps({POLICY: [cert]}, indent=2))


#: What an app's alert says when it did not trust the certificate it got.
_DISTRUST = ("CERTIFICATE_UNKNOWN", "UNKNOWN_CA", "BAD_CERTIFICATE")


def rejection_hint(command: str | None, reason: str) -> str | None:
    """Why a browser that rejected tapui's certificate (`reason`, its alert) may have, from the
    command line of its process; None for other apps and other reasons."""
    if not command or not any(alert in reason for alert in _DISTRUST):
        return None
    name = command.lower()
    if "chrom" in name:  # chrome, chromium, chrome-headless-shell
        return ("Chrome and Chromium trust tapui's CA only through a policy directory of theirs "
                "in /etc, e.g. /etc/chromium/policies/managed: create it once, as root")
    if "firefox" in name:
        return "Firefox trusts only its own certificate store, which tapui does not change"
    return None
