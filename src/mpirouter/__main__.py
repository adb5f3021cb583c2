"""python -m mpirouter train ...   (also: torchrun --nproc_per_node=2 -m mpirouter train ...)"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
