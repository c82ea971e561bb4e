"""bagel-train where rank 1 dies (os._exit(3)) at the start of step 3: the survivor must say so in
one line. Launched by test_distributed.py as two plain processes (no torchrun, whose agent would
kill the survivor first).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P python tests/train/die_at_step.py ARGS...
"""

import os
import sys

from bagel.cli.train import main
from bagel.train import trainer

if __name__ == "__main__":
    train_step = trainer.Trainer.train_step

    def train_step_or_die(self, items):
        if self.dist.rank == 1 and self.step == 2:
            os._exit(3)
        return train_step(self, items)

    trainer.Trainer.train_step = train_step_or_die
    sys.exit(main(sys.argv[1:]))
