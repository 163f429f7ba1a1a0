"""Telling systemd how the broker is doing: the sd_notify datagram protocol.

The packaged unit (``etc/ave/ave-broker.service``) is ``Type=notify``: systemd counts
the broker as started only when it says ``READY=1``, so ``systemctl start`` returns
once clients can be served, and a broker that fails while loading its configuration
fails the start instead of looking healthy for a moment. The protocol is one
datagram of ``KEY=value`` lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET``;
a name starting with ``@`` lives in the abstract namespace. It is implemented here
with the standard library rather than libsystemd, which a lab host running AVE
without systemd should not need.

``ave-broker --start --foreground`` sends ``READY=1`` once it serves. A broker that
takes over from another (``ave-broker --restart``, which is the unit's
``ExecReload``) is not the process systemd started, so it must say
``MAINPID=<its pid>\\nREADY=1`` *before* the old broker exits: systemd takes the exit
of the process it believes to be the main one for the end of the service and would
stop everything left in the unit. The unit sets ``NotifyAccess=all`` so that systemd
accepts these messages from a process other than the one it started.

``$NOTIFY_SOCKET`` is deliberately left in the environment, because the broker that
takes over during a reload is started by a command that needs it too.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (``KEY=value`` lines) to the supervising systemd.

    Returns True when the datagram was sent, False when no supervisor listens
    (``$NOTIFY_SOCKET`` unset: run by hand, by a test or by another init system) or
    sending failed. A failure is logged but not raised: the broker serves its
    clients either way, and systemd reports a missing ``READY=1`` itself.
    """
    address = os.environ.get('NOTIFY_SOCKET')
    if not address:
        return False
    if address.startswith('@'):
        address = '\0' + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode('utf-8'), address)
    except OSError as error:
        log.warning('could not notify systemd at %s: %s', os.environ['NOTIFY_SOCKET'], error)
        return False
    return True
