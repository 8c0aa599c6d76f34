"""SSH deployment: pushing a server to hosts that have nothing but Python, and starting it there."""
