"""The grammar of a port an image exposes (``3000``, ``3000/tcp``, ``53/udp``): one definition for the
schema and for the OCI image config (``fleet.images.ocilayout``). Standard library only."""

import re

_PORT = re.compile(r"([0-9]{1,5})(?:/(tcp|udp|sctp))?")


def port_key(value: str) -> str:
    """``PORT/proto`` as an OCI ``ExposedPorts`` key; ``ValueError`` with a one-line reason otherwise."""
    match = _PORT.fullmatch(str(value))
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"exposed port {value!r} is not PORT or PORT/tcp|udp|sctp with a port from 1 to 65535")
    return f"{int(match.group(1))}/{match.group(2) or 'tcp'}"
