"""``distill export``: a trained student (run checkpoint or megatron checkpoint) to a Hugging Face directory.

Runs in one process by default (TP=1, PP=1: the checkpoint is resharded on
load), or under torchrun with ``--tensor``/``--pipeline`` for students too large
for one process. Writes ``config.json``, safetensors shards with an index, and
the tokenizer files when ``--tokenizer-dir`` is given; ``config.json`` then
carries that tokenizer's ``bos_token_id``/``eos_token_id`` (``null`` without
one). Files are written ``0644`` under the usual umask. docs/models.md.
"""

from __future__ import annotations

import argparse

import torch

from distill_plugins.engine import process_groups as parallel_state
from distill_plugins.engine.cpu import disable_cpu_mode, enable_cpu_mode
from distill_plugins.logging import get_logger
from distill_plugins.recipe.schema import ParallelSpec


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export a trained student to a Hugging Face model directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run checkpoint (…/checkpoints/step_N) or a megatron checkpoint directory")
    p.add_argument("out_dir", help="the Hugging Face directory to write")
    p.add_argument("--family", choices=["llama", "mistral", "qwen2", "gpt2"], default=None,
                   help="HF architecture to write (default: the one recorded in the checkpoint)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="the tokenizer the student was trained with (HF directory or tokenizer.json): its files are "
                        "copied and its bos/eos token ids written to config.json")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="weights dtype (default: as trained)")
    p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size to load with (world size under torchrun)")
    p.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel size to load with")
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo (default when no GPU is present)")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    # megatron-core (through the model builder) takes seconds to import; `distill` imports this module to build
    # its parser, so `distill --help`, check and plan stay megatron-free
    from distill_plugins.models.hf_export import export_megatron_checkpoint

    cpu = args.cpu or not torch.cuda.is_available()
    if cpu:
        enable_cpu_mode()
    parallel_state.initialize(ParallelSpec(tensor=args.tensor, pipeline=args.pipeline), cpu=cpu)
    try:
        out = export_megatron_checkpoint(args.checkpoint, args.out_dir, family=args.family,
                                         tokenizer_dir=args.tokenizer_dir, dtype=args.dtype)
    finally:
        parallel_state.destroy()
        if cpu:  # in-process callers (tests, notebooks) get torch back as it was
            disable_cpu_mode()
    get_logger(__name__).info("exported %s to %s", args.checkpoint, out)
    return 0
