"""Running ssh from this machine: the command line that reaches a host, and what its errors mean.

Both :func:`rpycsvc.deploy` (starting servers) and attaching to a deployed server
(``connect("ssh://...")``) run the user's own ssh this way, so ``~/.ssh/config`` and the agent
apply to both alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from rpycsvc.errors import ConfigError

#: ssh options always given (yours come first and win): no prompts, notice a dead link.
SSH_DEFAULTS = ("-o", "BatchMode=yes", "-o", "ServerAliveInterval=2",
                "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=10")


def ssh_argv(host: str, ssh_command: Sequence[str] = ("ssh",),
             ssh_options: Sequence[str] = ()) -> list[str]:
    """``[user@]host[:port]`` → the ssh command line that reaches it."""
    dest, port = host, None
    if host.count(":") == 1 and not host.startswith("["):
        dest, port = host.rsplit(":", 1)
    elif host.startswith("[") and "]:" in host:
        dest, port = host[1:].split("]:", 1)
    if port is not None and not port.isdigit():
        raise ConfigError(f"bad host {host!r}: the port after ':' must be a number")
    # ssh keeps the FIRST value it sees for an option: the caller's go first and win
    argv = [*ssh_command, *ssh_options, *SSH_DEFAULTS]
    if port:
        argv += ["-p", port]
    return [*argv, dest]


#: What ssh prints on stderr when it can't connect -> what that means, in words to act on.
SSH_ERRORS = {
    "Permission denied": "ssh authentication failed (Permission denied): check the user, the "
    "key (IdentityFile) and the host's authorized_keys",
    "Host key verification failed": "host key verification failed: the host key is unknown "
    "or has changed; check known_hosts",
    "Could not resolve hostname": "unknown host: its name could not be resolved",
    "Connection refused": "connection refused: is sshd running on that address and port?",
    "timed out": "connection timed out: the host or the network does not answer",
    "No route to host": "no route to host",
    "Network is unreachable": "network is unreachable",
}
