"""Crash-test worker (run as a script): stores, reads and evicts disk entries until it is killed with SIGKILL.

Usage: python crash_worker.py CACHE_DIR SEED BUDGET_BYTES. Prints "ready" once the tier is open.
"""

from __future__ import annotations

import random
import sys
import time

from helpers import B, ROOT_A, make_block, make_partial, open_tier, store


def main() -> None:
    folder, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tier = open_tier(folder, budget_bytes=budget, max_queue_entries=16)
    rng = random.Random(seed)
    parents = [ROOT_A] + [entry.key for entry in tier.entries() if not entry.is_tail]
    print("ready", flush=True)
    while True:
        op = rng.random()
        parent = rng.choice(parents[-64:])
        if op < 0.75:
            entry = make_block(parent, [rng.randrange(40) for _ in range(B)])
            if store(tier, entry):
                parents.append(entry.key)
        elif op < 0.85:
            store(tier, make_partial(parent, [rng.randrange(40)], has_logits=rng.random() < 0.5))
        elif op < 0.93:
            try:
                tier.prepare_load([parent])
            except KeyError:
                pass
        elif op < 0.97:
            tier.evict(rng.choice(parents))
        else:
            time.sleep(0.002)


if __name__ == "__main__":
    main()
