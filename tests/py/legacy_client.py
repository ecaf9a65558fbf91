"""The legacy synchronous qemu.qmp.legacy.QEMUMonitorProtocol through qmpmux.

cmd() sends ids ("__qmp#NNNNN"); cmd_obj()/cmd_raw() send none and take the
next id-less reply. Prints one JSON object with what it saw; exits non-zero
on any failure.

usage: legacy_client.py SOCKET
"""

import json
import sys

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

TIMEOUT = 10.0


def main(path):
    out = {}
    qmp = QEMUMonitorProtocol(path)
    qmp.settimeout(TIMEOUT)
    greeting = qmp.connect()
    out["greeting_version"] = greeting["QMP"]["version"]["qemu"]
    out["greeting_capabilities"] = greeting["QMP"]["capabilities"]

    out["status"] = qmp.cmd("query-status")
    # No id on the wire for these: replies matched by order.
    out["name"] = qmp.cmd_obj({"execute": "query-name"})
    out["version"] = qmp.cmd_raw("query-version")
    out["unknown"] = qmp.cmd_obj({"execute": "no-such-command"})
    out["bad_args"] = qmp.cmd_raw("query-status", {"bogus": 1})
    try:
        qmp.cmd("no-such-command")
        out["unknown_raises"] = None
    except ExecuteError as err:
        out["unknown_raises"] = err.error_class

    # Alternate id-less and id'd requests many times.
    for i in range(50):
        assert qmp.cmd_obj({"execute": "query-status"})["return"]["running"] is True
        assert qmp.cmd("query-name") == {}

    qmp.cmd("stop")
    out["stop_events"] = [e["event"] for e in qmp.get_events(wait=TIMEOUT)]
    out["paused"] = qmp.cmd_obj({"execute": "query-status"})["return"]["status"]
    qmp.cmd_obj({"execute": "cont"})
    resume = qmp.pull_event(wait=TIMEOUT)
    out["resume_event"] = resume["event"] if resume else None
    out["running_again"] = qmp.cmd("query-status")["status"]
    qmp.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1]), sort_keys=True))
