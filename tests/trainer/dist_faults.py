"""A torchrun script: `mpirouter train` with one rank's checkpoint writes refused, as on a node whose folder is read-only.

    torchrun --standalone --nproc_per_node=2 tests/trainer/dist_faults.py RANK ERRNO train --out RUN ...

Run by tests/trainer/test_dist_errors.py (issue #22 row 12). Every DCP write of rank RANK raises OSError(ERRNO)
naming the shard file it would have written; the other ranks write normally.
"""

import os
import sys
from pathlib import Path

from torch.distributed.checkpoint import filesystem


def refuse_writes(errno_: int, rank: int) -> None:
    def write_data(self, plan, planner):
        raise OSError(errno_, os.strerror(errno_), str(Path(self.path) / f"__{rank}_0.distcp"))

    filesystem.FileSystemWriter.write_data = write_data


if __name__ == "__main__":
    victim, code, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    if int(os.environ["RANK"]) == victim:
        refuse_writes(code, victim)
    from mpirouter.cli import main

    sys.exit(main(argv))
