"""USP (Ulysses inside a host, ring across hosts) with compression on the inter-host hops only.

On a cluster (2 hosts x 4 GPUs, say), start it with any launcher, e.g.::

    compact-hooks launch --launcher mpirun --hostfile hosts --ifname eth1 -- python examples/usp_link_aware.py

On one machine, ``--fake-hosts 2`` names the ranks' hosts ``host0``/``host1`` (consecutive halves) so
the hybrid layout and the link classes can be tried on CPU::

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        examples/usp_link_aware.py --fake-hosts 2

Every rank prints its groups; rank 0 prints the bytes per link class and the difference from an
uncompressed USP run of the same seed.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from compact_hooks.integrations.diffusers import parallelize
from compact_hooks.integrations.diffusers.tiny import default_flux_pipeline, default_prompt_embeds
from compact_hooks.launcher.mpi import init_distributed

import compact_hooks as ch
from compact_hooks.hooks.links import LinkAwareHook
from compact_hooks.topology import Topology


def generate(pipe, prompt, hook, topology, steps: int) -> torch.Tensor:
    with parallelize(pipe, None, mode="usp", hook=hook, topology=topology) as handle:
        usp = handle.state.comm.usp
        latent = pipe(**prompt, num_inference_steps=steps, height=64, width=64, output_type="latent",
                      generator=torch.Generator().manual_seed(0)).images
    return latent, usp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fake-hosts", type=int, default=0, help="name the ranks' hosts host0..N-1 (one machine)")
    p.add_argument("--steps", type=int, default=4)
    args, _ = p.parse_known_args()

    torch.set_num_threads(1)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    name = f"host{rank * args.fake_hosts // world}" if args.fake_hosts else None
    topology = Topology(name)  # hostnames are exchanged once, at the first question about a group

    pipe = default_flux_pipeline(heads=4, head_dim=32, layers=2, single_layers=2)
    pipe.set_progress_bar_config(disable=True)
    prompt = default_prompt_embeds(pipe, text_tokens=16)

    exact, usp = generate(pipe, prompt, ch.PassthroughHook(), topology, args.steps)
    hook = LinkAwareHook(ch.CompactHook({"compressor": "int2", "warmup_compressor": "int8"}), ch.PassthroughHook(),
                         topology, compress=("inter_host",))
    latent, _ = generate(pipe, prompt, hook, topology, args.steps)
    print(f"rank {rank} on {topology.hostname}: ulysses_degree {usp.ulysses_degree}, ring_degree {usp.ring_degree}, "
          f"grid {usp.grid}", flush=True)
    dist.barrier()
    if rank == 0:
        for link, s in hook.stats()["links"].items():
            print(f"{link}: {s['calls']} calls, {s['raw_bytes'] / 1e6:.2f} MB raw, {s['wire_bytes'] / 1e6:.2f} MB "
                  f"on the wire (ratio {s['compression_ratio'] or 0:.2f})")
        rel = float(torch.linalg.vector_norm(latent - exact) / torch.linalg.vector_norm(exact))
        print(f"rel-L2 of the latent vs uncompressed USP: {rel:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
