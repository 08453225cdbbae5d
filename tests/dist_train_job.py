"""A tiny data-parallel training job for tests/test_train.py.

Run as `python tests/dist_train_job.py OUT BATCH` for one process, or under
`torchrun --nproc_per_node 2 tests/dist_train_job.py OUT BATCH` for two gloo processes; the main process writes
the history and the final weights to OUT.
"""
import json
import sys

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from alignbook.core import sequence_logps, token_logps
from alignbook.models import tiny_causal_lm
from alignbook.train import train


def lm_loss(model, batch):
    logps, mask = token_logps(model(batch).logits, batch)
    return -sequence_logps(logps, mask, average=True).mean(), {}


def main(out: str, batch_size: int) -> None:
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    tokens = torch.randint(0, 32, (32, 12), generator=torch.Generator().manual_seed(0))
    # Dropout off: random masks would differ between one and two processes.
    model = tiny_causal_lm(vocab_size=32, hidden_size=32, seed=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    loader = DataLoader(tokens, batch_size=batch_size, shuffle=False)
    history = train(model, lm_loss, loader, steps=4, lr=1e-2, progress=False, accelerator=accelerator)
    if accelerator.is_main_process:
        state = {k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()
                 if k != "lm_head.weight"}  # tied to the token embedding
        save_file(state, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"history": history, "world_size": accelerator.num_processes}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
