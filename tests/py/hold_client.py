"""A qemu.qmp QMPClient that stays connected while something else runs.

Connects, prints "connected" (a readiness line), and waits until its stdin
is closed; then runs query-status and prints one JSON object with the names
of the events it received meanwhile (from its `events` listener) and the
status.

usage: hold_client.py SOCKET
"""

import asyncio
import json
import sys

from qemu.qmp import QMPClient


async def main(path):
    client = QMPClient("holder")
    await asyncio.wait_for(client.connect(path), 10)
    print("connected", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    # Events QEMU sent before this reply are already queued by now.
    status = await asyncio.wait_for(client.execute("query-status"), 10)
    events = [e["event"] for e in client.events.clear()]
    await client.disconnect()
    return {"events": events, "status": status["status"]}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))), flush=True)
