"""Started by torchrun from tests/test_distributed.py: trains on the planted snapshot of
conftest.py with the configuration overrides given as JSON, and saves what each rank ends
with (``--out``: ``<out>.rank<r>``: the best epoch's weights, the epoch history and the epoch
it started from), and ``<out>.rank<r>.threads``: the names of the threads still running once
the rank has left the process group.

``--crash-after-epoch N`` makes rank 0 exit hard right after writing epoch N's checkpoint: a
run killed between two epochs, which torchrun then tears down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_planted_snapshot  # noqa: E402

from piarec.config import load_config  # noqa: E402
from piarec.train import trainer  # noqa: E402
from piarec.train.checkpoint import load_checkpoint  # noqa: E402
from piarec.train.distributed import ranks_from_env, stop  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--overrides", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--crash-after-epoch", type=int)
    args = p.parse_args()
    torch.set_num_threads(1)
    ranks = ranks_from_env()
    cfg = load_config(environ={}, overrides=json.loads(args.overrides))

    if args.crash_after_epoch:
        save = trainer.save_checkpoint

        def save_then_die(uri, state):
            save(uri, state)
            if state.epoch == args.crash_after_epoch:
                os._exit(17)

        trainer.save_checkpoint = save_then_die

    ck = load_checkpoint(args.checkpoint, torch.device("cpu")) if args.checkpoint else None
    result = trainer.train(cfg, make_planted_snapshot(), checkpoint_path=args.checkpoint)
    torch.save({"best": result.model.state_dict(), "best_epoch": result.best_epoch, "history": result.history,
                "start_epoch": ck.epoch if ck else 0, "world": ranks.world}, f"{args.out}.rank{ranks.rank}")
    stop()
    # the threads this rank still runs once it has left the process group (Linux names them)
    threads = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    Path(f"{args.out}.rank{ranks.rank}.threads").write_text(json.dumps(sorted(threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
