"""Wait until the Ray head's GCS port accepts connections: what a Ray worker node does before `ray start --address`.

`python -m cipo_nemo.distributed.wait_for_head --address HEAD:PORT --timeout-s 600`, run by slurm/ray_worker.sh on
every worker node. The launcher starts the workers only after the head has printed that it is up, but a node may
still see the head's address later (a slow network or DNS on a big cluster), and a `ray start --address` that cannot
reach the GCS gives up. Exit status 0 when the port answered, 1 after the timeout (with a message naming the address).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time


def wait_for_port(host: str, port: int, *, timeout_s: float, retry_every_s: float = 1.0) -> tuple[bool, int]:
    """Try a TCP connection until one succeeds or `timeout_s` passes; returns (reached, attempts)."""
    deadline = time.monotonic() + timeout_s
    attempts = 0
    while True:
        attempts += 1
        try:
            with socket.create_connection((host, port), timeout=min(retry_every_s * 5, 10.0)):
                return True, attempts
        except OSError:
            if time.monotonic() + retry_every_s > deadline:
                return False, attempts
            time.sleep(retry_every_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cipo_nemo.distributed.wait_for_head", description=__doc__)
    parser.add_argument("--address", required=True, help="Ray head GCS, host:port")
    parser.add_argument("--timeout-s", type=float, required=True)
    parser.add_argument("--retry-every-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    started = time.monotonic()
    reached, attempts = wait_for_port(host, int(port), timeout_s=args.timeout_s, retry_every_s=args.retry_every_s)
    if not reached:
        print(f"the Ray head at {args.address} did not answer within {args.timeout_s:g} s ({attempts} attempts)",
              file=sys.stderr)
        return 1
    print(f"the Ray head at {args.address} answered after {time.monotonic() - started:.1f} s ({attempts} attempt(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
