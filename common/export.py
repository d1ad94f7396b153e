"""Export the trunk of a pretraining checkpoint for transfer: a torchvision state_dict or a detectron2 .pkl.

    python -m common.export CHECKPOINT OUT --format torchvision|detectron2 [-a ARCH]

CHECKPOINT is any checkpoint that lincls.py and finetune.py accept, checked as strictly: ours (the architecture is
read from it), the MoCo repository's or the SwAV repository's (-a, default resnet50). OUT is written atomically,
never overwritten. The two formats, and detectron2's settings for them: docs/checkpoints.md.
"""

import argparse
import os
import pickle
import re

import torch
import torchvision

from common import ckpt
from common.cli import UserError, run

ARCHS = sorted(n for n in torchvision.models.list_models(torchvision.models) if "resne" in n)
FORMATS = ("torchvision", "detectron2")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="pretraining checkpoint: ours, public MoCo or SwAV-repo")
    p.add_argument("out", metavar="OUT", help="file to write (must not exist; *.pkl for detectron2)")
    p.add_argument("--format", default="torchvision", choices=FORMATS, help="torchvision (default) or detectron2")
    p.add_argument("-a", "--arch", default=None, choices=ARCHS, help="for public checkpoints (default resnet50)")
    return p


def detectron2_name(key: str) -> str:
    """A torchvision ResNet trunk key in detectron2's names: conv1.weight -> stem.conv1.weight, layer1.0.bn2.bias ->
    res2.0.conv2.norm.bias, layer2.0.downsample.1.bias -> res3.0.shortcut.norm.bias."""
    if not key.startswith("layer"):  # the stem: conv1 and its norm bn1
        return "stem." + re.sub(r"^bn1\.", "conv1.norm.", key)
    stage, rest = key.split(".", 1)
    name = f"res{int(stage.removeprefix('layer')) + 1}.{rest}"
    name = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", name)
    return name.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")


def to_detectron2(trunk: dict) -> dict:
    return {detectron2_name(k): v.numpy() for k, v in trunk.items() if not k.endswith("num_batches_tracked")}


def main(args) -> str:
    if os.path.lexists(args.out):
        raise UserError(f"{args.out} already exists; remove it or choose another OUT")
    if args.format == "detectron2" and not args.out.endswith(".pkl"):
        raise UserError(f"{args.out}: detectron2 reads this layout only from a file named *.pkl")
    obj = ckpt.load(args.checkpoint)
    ours = isinstance(obj, dict) and obj.get("format") == ckpt.FORMAT
    if ours and args.arch and args.arch != obj.get("arch"):
        raise UserError(f"{args.checkpoint} holds a {obj.get('arch')} trunk, not -a {args.arch} (drop -a for ours)")
    arch = args.arch or (obj.get("arch") if ours else None) or "resnet50"
    if arch not in ARCHS:
        supported = ", ".join(ARCHS)
        raise UserError(f"{args.checkpoint}: {arch} is not a torchvision ResNet; the export supports {supported}")
    trunk = {k: v.detach().clone().contiguous() for k, v in ckpt.trunk_of(obj, args.checkpoint, arch).items()}
    if args.format == "torchvision":
        written = trunk
        ckpt.write_atomic(args.out, lambda f: torch.save(trunk, f))
    else:
        source = f"{obj['method']} epoch {obj['epoch']}" if ours else "a public checkpoint"
        written = to_detectron2(trunk)
        d2 = {"model": written, "__author__": f"common.export ({source})", "matching_heuristics": True}
        ckpt.write_atomic(args.out, lambda f: pickle.dump(d2, f))
    print(f"wrote {args.out}: the {arch} trunk of {args.checkpoint} ({len(written)} tensors), {args.format} format")
    return args.out


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
