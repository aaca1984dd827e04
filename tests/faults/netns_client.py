"""A one-shot DHT client for the network-namespace test, run inside a namespace:

    python netns_client.py publish BIND_HOST BOOTSTRAP_HOST:PORT... --label L --seq N
    python netns_client.py get BIND_HOST BOOTSTRAP_HOST:PORT... --label L

Prints one JSON line: the seqs found (get) or the acknowledgements (publish)."""

from __future__ import annotations

import argparse
import json
import time

import trio

from p2pbuild import SignedRecord
from p2pbuild.dht import node_id_for, node_key, open_directory
from p2pbuild.testing import example_capability, make_identity


async def main(args: argparse.Namespace) -> None:
    identity = make_identity(args.label)
    bootstrap = [(h, int(p)) for h, p in (item.rsplit(":", 1) for item in args.bootstrap)]
    node_id = node_id_for(identity.public_key) if args.action == "publish" else None
    with trio.fail_after(args.timeout):
        async with open_directory(args.bind, 0, bootstrap=bootstrap, node_id=node_id) as d:
            if args.action == "publish":
                record = SignedRecord.create(identity, example_capability(), seq=args.seq,
                                             issued_at=int(time.time()), lifetime=3600)
                acks = await d.put(node_key(identity.public_key), [record])
                print(json.dumps({"acks": acks, "contacts": len(d.contacts())}))
            else:
                records = await d.get(node_key(identity.public_key))
                print(json.dumps({"seqs": [r.seq for r in records],
                                  "contacts": len(d.contacts())}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["publish", "get"])
    parser.add_argument("bind")
    parser.add_argument("bootstrap", nargs="+")
    parser.add_argument("--label", required=True)
    parser.add_argument("--seq", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=20)
    trio.run(main, parser.parse_args())
