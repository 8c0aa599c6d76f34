"""What both sides of the wire share: framing, task messages, serialization, the handshake,
RPyC stream fixes."""
