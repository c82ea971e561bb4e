"""bagel-train that dies (os._exit(17)) inside the save of step N, after every shard is written but
before the checkpoint is committed: the fault a kill -9 mid-save leaves behind.

    python tests/train/crash_during_save.py N [bagel-train arguments ...]
"""

import os
import sys

from bagel.cli.train import main
from bagel.train import checkpointing

if __name__ == "__main__":
    crash_step, argv = int(sys.argv[1]), sys.argv[2:]
    commit = checkpointing.commit

    def commit_or_die(tmp, final, trainer_state, config_yaml):
        if trainer_state["step"] == crash_step:
            os._exit(17)
        commit(tmp, final, trainer_state, config_yaml)

    checkpointing.commit = commit_or_die
    sys.exit(main(argv))
