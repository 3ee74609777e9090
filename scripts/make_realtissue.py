"""Write the real-tissue training subjects of one patient26 hemisphere (or both) into a cohort folder.

    python scripts/make_realtissue.py --side left --n 24 --out data/realtissue_left [--seed 0]

See msxai.realtissue. The folder holds data derived from the real patient: it stays out of the repository
(data/ is git-ignored)."""

from __future__ import annotations

import argparse
import time

from msxai.realtissue import SIDES, make_realtissue_cohort


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t0 = time.time()
    path = make_realtissue_cohort(a.out, a.n, a.side, seed=a.seed)
    print(f"{path} ({a.n} subjects, {(time.time() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
