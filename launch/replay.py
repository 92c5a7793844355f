"""Rebuild a MeZO fine-tune from its base model and trajectory.jsonl, on any launcher."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mezo_dist.replay import main  # noqa: E402

if __name__ == "__main__":
    code = main(sys.argv[1:])
    # Everything is written and the process group is destroyed by now. Leave without the
    # interpreter's teardown of C++ objects, where gloo's threads sometimes abort the process
    # ("terminate called without an active exception") and turn a finished run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
