"""bcrypt hashes per second at a cost: on one thread, and on every core (a process pool).

    bench/.venv/bin/python bench/vpy/bcrypt_rate.py COST N

Prints JSON: single_thread_per_s, pool_all_cores_per_s, cores_x_single_thread_per_s, cores.
Run with the venv's python (the `bcrypt` package, its hashing core is Rust) by
bench/measure.py's bcrypt_rate().
"""

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def hash_n(args):
    """Seconds to hash a password n times at cost (in a pool worker: importable by name)."""
    cost, n = args
    import bcrypt

    salt = bcrypt.gensalt(cost)
    t0 = time.perf_counter()
    for _ in range(n):
        bcrypt.hashpw(b"bench-password", salt)
    return time.perf_counter() - t0


def main() -> None:
    cost, n = int(sys.argv[1]), int(sys.argv[2])
    one = hash_n((cost, n))
    cores = os.cpu_count()
    with ProcessPoolExecutor(cores) as pool:
        _ = list(pool.map(hash_n, [(cost, 1)] * cores))  # spawn + warm
        t0 = time.perf_counter()
        list(pool.map(hash_n, [(cost, n)] * cores))
        wall = time.perf_counter() - t0
    print(json.dumps({"single_thread_per_s": n / one, "pool_all_cores_per_s": cores * n / wall,
                      "cores_x_single_thread_per_s": cores * n / one, "cores": cores}))


if __name__ == "__main__":
    main()
