"""The netfilter rules inside an app's namespace (`sluice run`): every outbound TCP
connection is REDIRECTed to the transparent listener; other traffic leaving the namespace
is refused, except DNS to the relay on 127.0.0.1:53 and replies to connections made to the
app.

The rules live in the namespace's own tables, so they vanish with it, and they only see
the app's packets: the sidecar's upstream connections leave from the host namespace
(docs/decisions/0009-transparent-interception.md). Rules are loaded with one
`iptables-restore` per family (atomic, one process each), through whichever iptables the
system selects (nf_tables or legacy); when that fails, the legacy binary is tried.
Without ip6tables, IPv6 is switched off in the namespace instead, so that nothing can
leave by it unseen.
"""

from __future__ import annotations

import shutil
import subprocess

from sidecar.netns import NetnsError

DNS_PORT = 53


def rules_v4(port: int) -> str:
    """iptables-restore input: TCP to the listener on `port`, except DNS to the relay."""
    return (
        "*nat\n"
        ":OUTPUT ACCEPT [0:0]\n"
        f"-A OUTPUT -p tcp -d 127.0.0.1/32 --dport {DNS_PORT} -j RETURN\n"
        f"-A OUTPUT -p tcp -j REDIRECT --to-ports {port}\n"
        "COMMIT\n"
        "*filter\n"
        ":OUTPUT ACCEPT [0:0]\n"
        "-A OUTPUT -o lo -j ACCEPT\n"
        # After the REDIRECT the packet is addressed to 127.0.0.1 (filter runs after nat).
        "-A OUTPUT -d 127.0.0.0/8 -j ACCEPT\n"
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        "-A OUTPUT -j REJECT --reject-with icmp-admin-prohibited\n"
        "COMMIT\n"
    )


def rules_v6(port: int) -> str:
    """ip6tables-restore input: TCP to the listener on [::1]:`port`; nothing else leaves."""
    return (
        "*nat\n"
        ":OUTPUT ACCEPT [0:0]\n"
        f"-A OUTPUT -p tcp -j REDIRECT --to-ports {port}\n"
        "COMMIT\n"
        "*filter\n"
        ":OUTPUT ACCEPT [0:0]\n"
        "-A OUTPUT -o lo -j ACCEPT\n"
        "-A OUTPUT -d ::1/128 -j ACCEPT\n"
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        "-A OUTPUT -j REJECT --reject-with icmp6-adm-prohibited\n"
        "COMMIT\n"
    )


def _restore(namespace: str, binaries: tuple[str, ...], rules: str) -> str | None:
    """Load `rules` in the namespace with the first binary that works; None when done,
    else why the last one failed."""
    problem = "not installed"
    for binary in binaries:
        if shutil.which(binary) is None:
            continue
        try:
            done = subprocess.run(
                ["ip", "netns", "exec", namespace, binary],
                input=rules,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = f"{binary}: {exc}"
            continue
        if done.returncode == 0:
            return None
        problem = f"{binary}: {done.stderr.strip() or f'exit {done.returncode}'}"
    return problem


def install(namespace: str, port: int, v6: bool) -> bool:
    """Load the rules for a listener on `port` (IPv4, and IPv6 when `v6`); returns whether
    the IPv6 rules are in place. Raises NetnsError when the IPv4 rules cannot be loaded."""
    problem = _restore(namespace, ("iptables-restore", "iptables-legacy-restore"), rules_v4(port))
    if problem is not None:
        raise NetnsError(f"cannot load the namespace's iptables rules: {problem}")
    if not v6:
        return False
    return (
        _restore(namespace, ("ip6tables-restore", "ip6tables-legacy-restore"), rules_v6(port))
        is None
    )
