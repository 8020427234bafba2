"""pretrain.py whose every rank dies by SIGKILL right after checkpoint-<KILL_AFTER_CHECKPOINT> is complete:
a node lost mid-run, at a known step, for the kill-and-resume tests (run directly or under torchrun)."""
import os
import signal
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain  # noqa: E402

KILL_AFTER = int(os.environ["KILL_AFTER_CHECKPOINT"])


class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == KILL_AFTER:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank has written its part of the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)


class DoomedTrainer(pretrain.PretrainTrainer):
    def __init__(self, *args, callbacks=(), **kwargs):
        super().__init__(*args, callbacks=[*callbacks, KillAfterCheckpoint()], **kwargs)


pretrain.PretrainTrainer = DoomedTrainer
sys.exit(pretrain.main(sys.argv[1:]))
