"""MeZO fine-tuning: the one entry point under python, torchrun, deepspeed and accelerate launch."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mezo_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
