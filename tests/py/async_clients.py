"""Two qemu.qmp QMPClient connections on one qmpmux socket at the same time.

Each runs many concurrent execute('query-status') calls (ids "__qmp#NNNNN"
from each client's own counter: the two clients use the same ids), client A
stops and resumes the VM, and both must receive STOP and RESUME: A through
its default `events` listener, B through a `listen()` context.

Prints one JSON object summarising what the clients saw; exits non-zero on
any failure.

usage: async_clients.py SOCKET
"""

import asyncio
import json
import sys

from qemu.qmp import EventListener, QMPClient

TIMEOUT = 10.0
PER_CLIENT = 200


async def next_event(listener, name):
    event = await asyncio.wait_for(listener.get(), TIMEOUT)
    assert event["event"] == name, f"expected {name}, got {event}"
    assert "timestamp" in event, event
    return event["event"]


async def queries(client, n):
    replies = await asyncio.gather(*(client.execute("query-status") for _ in range(n)))
    statuses = {r["status"] for r in replies}
    assert all(isinstance(r.get("running"), bool) for r in replies), replies[:3]
    return len(replies), sorted(statuses)


async def main(path):
    a = QMPClient("a")
    b = QMPClient("b")
    await asyncio.wait_for(asyncio.gather(a.connect(path), b.connect(path)), TIMEOUT)
    out = {
        "greeting_a": a.greeting._asdict(),
        "same_greeting": a.greeting._asdict() == b.greeting._asdict(),
    }

    b_listener = EventListener(("STOP", "RESUME"))
    with b.listen(b_listener):
        # Both clients at once, many requests in flight each.
        (na, sa), (nb, sb) = await asyncio.wait_for(
            asyncio.gather(queries(a, PER_CLIENT), queries(b, PER_CLIENT)), TIMEOUT
        )
        out["queries"] = [na, nb]
        out["statuses_before"] = sorted(set(sa) | set(sb))

        # A stops the VM while B keeps querying.
        stop_ret, (_, during) = await asyncio.wait_for(
            asyncio.gather(a.execute("stop"), queries(b, 50)), TIMEOUT
        )
        out["stop_return"] = stop_ret
        out["events_a"] = [await next_event(a.events, "STOP")]
        out["events_b"] = [await next_event(b_listener, "STOP")]
        out["status_paused"] = (await b.execute("query-status"))["status"]

        out["cont_return"] = await asyncio.wait_for(a.execute("cont"), TIMEOUT)
        out["events_a"].append(await next_event(a.events, "RESUME"))
        out["events_b"].append(await next_event(b_listener, "RESUME"))
        out["status_after"] = (await a.execute("query-status"))["status"]

    # Errors come back to the right caller as ExecuteError.
    try:
        await b.execute("no-such-command")
        out["error_class"] = None
    except Exception as err:  # qemu.qmp.ExecuteError
        out["error_class"] = getattr(err, "error_class", repr(err))

    await asyncio.gather(a.disconnect(), b.disconnect())
    return out


if __name__ == "__main__":
    result = asyncio.run(asyncio.wait_for(main(sys.argv[1]), 30))
    print(json.dumps(result, sort_keys=True))
