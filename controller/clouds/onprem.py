"""The `onprem` aggregator provider: the operator's own aggregator host is the controller's.

Configured by `[aggregator.onprem]` (see `clouds/settings.py`): the controller runs each job's
SuperLink itself, as `local` does, bound to `[aggregator] bind_host`, on a port from the
configured range (the ports the operator's firewall opens to the hospitals' VMs), and advertised
as `advertise_host`, the name its certificate carries. When configured it stands in for `local`
wherever placement falls back to the controller's own SuperLink, and placement names it.

Why on the controller's host and not a remote machine: a SuperLink elsewhere has to be started,
watched and stopped from here. The cloud providers do that through a VM's start-up script and
the enrolment listener; for an operator's machine that would need an SSH account with a pinned
host key or a long-running service of its own. The controller's host already holds what the
SuperLink needs (fedsky's CA, the job's model file, the bus identity of the ServerApp) and can
be placed where the operator wants the aggregator. See docs/deployment.md.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from fedsky.controller.clouds.base import AggregatorHandle, AggregatorSpec, ProviderError
from fedsky.controller.clouds.local import (
    START_TIMEOUT_S,
    LocalProvider,
    TlsIssuer,
    pki_tls_issuer,
    port_is_free,
)
from fedsky.controller.clouds.settings import AggregatorConfig
from fedsky.controller.security.pki import Pki


class OnPremProvider(LocalProvider):
    """The controller's SuperLinks on the operator's aggregator host, on a fixed port range."""

    name = "onprem"

    def __init__(
        self,
        *,
        work_dir: Path,
        issue_tls: TlsIssuer,
        host_name: str,
        ports: tuple[int, int],
        bind_host: str = "127.0.0.1",
        advertise_host: str = "127.0.0.1",
        control_identity: tuple[Path, Path] | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(
            work_dir=work_dir,
            issue_tls=issue_tls,
            bind_host=bind_host,
            advertise_host=advertise_host,
            control_identity=control_identity,
            start_timeout_s=start_timeout_s,
        )
        self.host_name = host_name
        self.ports = ports
        # One launch at a time: two jobs must not both find the same port free.
        self._launching = threading.Lock()

    def candidate_ports(self) -> Iterator[int]:
        """The range's ports that nothing listens on, lowest first."""
        first, last = self.ports
        found = False
        for port in range(first, last + 1):
            if port_is_free(self.bind_host, port):
                found = True
                yield port
        if not found:
            raise ProviderError(
                f"every port of aggregator.onprem.ports ({first}-{last}) is in use on "
                f"{self.bind_host}: widen the range or wait for a job to end"
            )

    def _launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        with self._launching:
            return super()._launch(spec)

    def describe(self) -> str:
        first, last = self.ports
        return (
            f"the operator's aggregator host {self.host_name} "
            f"({self.advertise_host}, ports {first}-{last})"
        )


def controller_aggregator(config: AggregatorConfig, *, work_dir: Path, pki: Pki) -> LocalProvider:
    """The provider of the SuperLinks the controller runs itself: `onprem` when configured,
    else `local`, both at `[aggregator]`'s addresses."""
    issue = pki_tls_issuer(pki)
    if config.onprem is not None:
        return OnPremProvider(
            work_dir=work_dir,
            issue_tls=issue,
            host_name=config.onprem.name,
            ports=config.onprem.ports,
            bind_host=config.bind_host,
            advertise_host=config.advertised,
            control_identity=pki.controller_identity,
        )
    return LocalProvider(
        work_dir=work_dir,
        issue_tls=issue,
        bind_host=config.bind_host,
        advertise_host=config.advertised,
        control_identity=pki.controller_identity,
    )
