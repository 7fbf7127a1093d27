#!/usr/bin/env python3
# Holds N idle TCP connections to the proxy as the user running it, until killed.
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(n):
    try:
        held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    except OSError:
        pass
print("holding", len(held), flush=True)
time.sleep(60)
