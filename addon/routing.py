"""Which flows the addon answers (a pure decision over what mitmproxy knows of a flow)."""

from __future__ import annotations

from collections.abc import Iterable

from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from addon.config import normalize_host


def is_answered(
    mode: ProxyMode | None,
    hosts: Iterable[str],
    *,
    host: str | None,
    host_header: str | None,
    sni: str | None,
) -> bool:
    """True when a flow is an OpenAI call this addon answers.

    On a reverse-mode listener the listener's target decides (every flow there goes to it).
    Elsewhere (explicit, transparent, local, WireGuard) the destination may be a bare IP, so the
    Host header and the TLS SNI count too.
    """
    wanted = set(hosts)
    if isinstance(mode, ReverseMode):
        return normalize_host(mode.address[0]) in wanted
    return any(
        candidate and normalize_host(candidate) in wanted for candidate in (host_header, sni, host)
    )
