"""File descriptors passed with SCM_RIGHTS through qmpmux, by stock qemu.qmp.

Client A passes a pipe end and claims it with `getfd`, passes another and
adds it to an fd set with `add-fd`; client B sees the fd set. When A leaves,
its `getfd` name is closed in QEMU (B's `closefd` of it fails). `getfd`
without a passed fd gets QEMU's own error.

Prints one JSON object; exits non-zero on failure.

usage: fd_passing.py SOCKET
"""

import asyncio
import json
import os
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(sock):
    out = {}
    a = QMPClient("a")
    b = QMPClient("b")
    await a.connect(sock)
    await b.connect(sock)

    r1, _w1 = os.pipe()
    a.send_fd_scm(r1)
    out["getfd"] = await a.execute("getfd", {"fdname": "backup-fd"})

    r2, _w2 = os.pipe()
    a.send_fd_scm(r2)
    out["add_fd"] = await a.execute("add-fd", {"opaque": "from-a"})
    out["fdsets_seen_by_b"] = await b.execute("query-fdsets")

    try:
        await b.execute("getfd", {"fdname": "no-fd"})
        out["getfd_without_fd"] = "ok"
    except ExecuteError as e:
        out["getfd_without_fd"] = str(e)

    await a.disconnect()
    # No QMP query lists getfd names; give qmpmux a moment to see A leave.
    await asyncio.sleep(0.5)
    try:
        await b.execute("closefd", {"fdname": "backup-fd"})
        out["closefd_after_a_left"] = "still open"
    except ExecuteError as e:
        out["closefd_after_a_left"] = str(e)
    await b.disconnect()
    print(json.dumps(out))


asyncio.run(main(sys.argv[1]))
