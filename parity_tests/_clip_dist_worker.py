"""A rank of the torch.distributed (gloo) CLIP loss test; imports torch only (spawned processes)."""

import os

import numpy as np
import torch
import torch.distributed as dist

from torch_reference import clip


def run(rank: int, world_size: int, init_file: str, inputs: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    data = np.load(inputs)
    model = clip.CLIP(**{k[3:]: data[k].item() for k in data.files if k.startswith("kw_")})
    model.load_state_dict({k[3:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("sd_")})
    n = len(data["images"]) // world_size
    x = torch.from_numpy(data["images"][rank * n:(rank + 1) * n])
    t = torch.from_numpy(data["tokens"][rank * n:(rank + 1) * n])
    loss = clip.contrastive_loss(*model.features(x, t))
    loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world_size
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        np.savez(os.path.join(out_dir, "grads.npz"), loss=(total / world_size).numpy(),
                 **{k: p.grad.numpy() for k, p in model.named_parameters()})
    dist.destroy_process_group()
