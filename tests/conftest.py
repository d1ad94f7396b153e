"""Shared fixtures: a tiny generated ImageFolder, a runner for the real scripts, a one-process group."""

import ast
import difflib
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.synthetic import make_image_folder  # noqa: E402

# Settings small enough for seconds on a CPU: resnet18 on 32-px crops, global batch 16, queue 64.
TINY = ["-a", "resnet18", "--crop-size", "32", "-b", "16", "-j", "0", "--print-freq", "4"]
# The MoCo family on TINY: a queue of 4 batches, BatchNorm groups of 8 (2 per process in one process, 1 in two).
MOCO_TINY = [*TINY, "--moco-k", "64", "--bn-group-size", "8"]
# The DeepCluster family: 2 x 32 px + 2 x 16 px crops, 3 heads of 20 clusters, a 1-epoch warm-up.
DC_TINY = [
    "-a", "resnet18", "-b", "16", "-j", "0", "--print-freq", "4", "--nmb-crops", "2", "2", "--size-crops", "32", "16",
    "--nmb-prototypes", "20", "20", "20", "--feat-dim", "16", "--hidden-mlp", "64", "--warmup-epochs", "1",
]  # fmt: skip
# The flags of each pretraining script's shared run (see `pretrained`).
PRETRAINED = {
    # the kept epoch 1 is where the resume test starts from; the kNN monitor after each epoch, which the resumed run
    # leaves out: the two end alike only if the monitor changes nothing
    "moco_v2.py": [*MOCO_TINY, "--save-freq", "1", "--knn-every", "1"],
    "mochi.py": [*MOCO_TINY, "--mochi-n", "16", "--mochi-s", "8", "--mochi-s-prime", "4", "--mix-start-epoch", "1"],
    "hexa_moco.py": MOCO_TINY,
    # a constant lr, so that a 1-epoch run is this run's first epoch (the resume test)
    "deepcluster_v2.py": [*DC_TINY, "--warmup-epochs", "0", "--lr", "0.1", "--final-lr", "0.1"],
    "hexa_dcluster.py": [*DC_TINY, "--adv-weight", "1"],  # both kinds of hard view (the default: cut-mixed only)
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 classes x 32 train x 8 val JPEG images of 48 px."""
    return make_image_folder(str(tmp_path_factory.mktemp("data")), classes=4, train_per_class=32, val_per_class=8)


def run_script(script, *args, nproc=1, check=True, timeout=600):
    """Run a top-level script as a user would: `python script ...`, or torchrun with nproc processes."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(
        launcher + [os.path.join(ROOT, script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


CKPT_KEYS = {"format", "method", "arch", "epoch", "backbone", "model", "optimizer", "args", "rng", "extra"}


def load_checked(path, method, epochs, arch="resnet18"):
    """A pretraining checkpoint with the documented schema, whose `backbone` loads strictly into a plain torchvision
    model minus its fc; returns it."""
    state = load_ckpt(path)
    assert set(state) == CKPT_KEYS and state["method"] == method and state["epoch"] == epochs
    missing, unexpected = torchvision.models.get_model(arch).load_state_dict(state["backbone"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    return state


@pytest.fixture
def process_group():
    """A one-process gloo group inside the test process (not through environment variables, so that the
    scripts the tests launch do not inherit it)."""
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    yield
    torch_dist.destroy_process_group()


def run_main(script, *args):
    """Run a top-level script's main() in this process on the command line `args` (a run costs no process start,
    most of a tiny run's time). Returns main()'s result; the process group it creates is destroyed even on failure."""
    mod = importlib.import_module(script.removesuffix(".py"))
    assert not torch_dist.is_initialized(), "run_main() inside a test that holds a process group"
    try:
        return mod.main(mod.get_args_parser().parse_args([str(a) for a in args]))
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


class Runs:
    """Each pretraining script's shared run: one process (run_main), 2 epochs on tiny_data with PRETRAINED[script]
    and the device views, made when a test first asks for it and reused by every later test (end-to-end checks,
    resume, linear evaluation, fine-tuning, export)."""

    def __init__(self, data, root):
        self.data, self.root, self.done = data, root, {}

    def __call__(self, script: str):
        if script not in self.done:
            out = self.root / script.removesuffix(".py")
            run_main(script, self.data, *PRETRAINED[script], "--views", "device", "--epochs", 2, "--output-dir", out)
            self.done[script] = out
        return self.done[script]


@pytest.fixture(scope="session")
def pretrained(tiny_data, tmp_path_factory):
    """pretrained(script) -> the output folder of the script's shared run (checkpoint.pth, log.jsonl)."""
    root = tmp_path_factory.mktemp("pretrained")
    yield Runs(tiny_data, root)
    shutil.rmtree(root)


@pytest.fixture(scope="session")
def two_processes(tiny_data, tmp_path_factory):
    """What the suite runs in two processes (tests/dist_checks.py), from one torchrun launch: {check name: result}
    and {run name: output folder} (moco_v2, ..., lincls_moco_v2, finetune_moco_v2)."""
    out = tmp_path_factory.mktemp("two_processes")
    run_script("tests/dist_checks.py", tiny_data, out, nproc=2, timeout=1200)
    results = {f.removesuffix(".pt"): torch.load(out / f, weights_only=False) for f in os.listdir(out) if ".pt" in f}
    results.update({f: out / f for f in os.listdir(out) if (out / f).is_dir()})
    yield results
    shutil.rmtree(out)


def main_error(module, *argv) -> str:
    """Run a script's main() in this process on argv; it must stop with a UserError (bad input): returns its message.
    Cheaper than a subprocess for a flag check; the process group main() created is destroyed."""
    from common.cli import UserError

    mod = importlib.import_module(module)
    assert not torch_dist.is_initialized()
    try:
        with pytest.raises(UserError) as err:
            mod.main(mod.get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    return str(err.value)


def diff_report(base: str, variant: str, tag: str | None = None) -> tuple[int, list[str]]:
    """`diff base variant` as the number of changed lines (removed + added, as difflib counts them), and the
    changed blocks of the variant that carry no `# <tag>:` comment, in them or on the line just before. Blocks
    inside the variant's module docstring are exempt: that is where a variant lists its deltas."""
    a = open(os.path.join(ROOT, base)).read().splitlines()
    b = open(os.path.join(ROOT, variant)).read().splitlines()
    module = ast.parse("\n".join(b))
    doc_end = module.body[0].end_lineno if ast.get_docstring(module) is not None else 0  # 1-based, inclusive
    size, untagged = 0, []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        size += (i2 - i1) + (j2 - j1)
        if tag and j2 > doc_end and not any(f"# {tag}:" in line for line in b[max(j1 - 1, 0) : max(j2, j1 + 1)]):
            untagged.append(f"{variant}:{j1 + 1}: {b[j1] if j1 < len(b) else '<end>'}")
    return size, untagged


def snapshot(model) -> dict:
    """A copy of the model's parameters and every buffer, to compare after something that must not touch them."""
    return {name: t.clone() for name, t in model.state_dict().items()}


def assert_harmless_attack(model, before, loss_fn, clean, adversarial, eps_255):
    """An attack (HEXA's adversarial_view) left the model as `before` with no parameter gradients, stayed within
    its budget, and raised the loss it attacks."""
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "the attack changed the model"
    assert all(p.grad is None for p in model.parameters()), "the attack left parameter gradients"
    assert_within_budget(clean, adversarial, eps_255)
    with torch.no_grad():
        clean_loss, adv_loss = loss_fn(clean), loss_fn(adversarial)
    assert adv_loss > clean_loss, (float(clean_loss), float(adv_loss))


def assert_within_budget(clean, adversarial, eps_255):
    """An attack's output, both normalised: within the L-inf budget eps/255 of the clean pixels (and using a fair
    part of it), inside [0, 1], detached."""
    from common.views import MEAN, STD

    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x0, x = clean * std + mean, adversarial * std + mean  # pixels
    assert not adversarial.requires_grad and adversarial.shape == clean.shape
    assert eps_255 / 255 / 2 <= (x - x0).abs().max() <= eps_255 / 255 + 1e-6
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6


def assert_clean_error(proc, fragment):
    """Bad input: exit code 2, no traceback, and the last line of stderr is `error: ...` naming `fragment`."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, last
