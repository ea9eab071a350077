"""What every command shares: the model flags and the one way a command loads its model."""
from __future__ import annotations

import argparse

import torch

from ..models import TINY_MODEL, load_clip


def add_model_args(p: argparse.ArgumentParser, *, default_model: str = TINY_MODEL) -> None:
    """The model flags every command that loads a model takes (including `--seed`)."""
    p.add_argument("--model-name", default=default_model, help=f"open_clip model name (default: {default_model})")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag (needs internet); default: random weights")
    p.add_argument("--checkpoint", default=None, help="local checkpoint file with the model's weights")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for random weights and any sampling (default 0): the same seed gives the same model")


def load_model(args):
    """(model, preprocess, tokenizer) from the model flags; random weights are drawn after
    `torch.manual_seed(args.seed)`, so every command with the same flags gets the same model."""
    torch.manual_seed(args.seed)
    return load_clip(args.model_name, args.pretrained, device=args.device, checkpoint=args.checkpoint)
