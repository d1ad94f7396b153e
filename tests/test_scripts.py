"""Every script: importable without side effects, --help, a docstring naming its base, the shared flags spelled
and explained the same way everywhere."""

import importlib

import pytest

SCRIPTS = {
    "moco_v2": "none",
    "mochi": "moco_v2.py",
    "hexa_moco": "moco_v2.py",
    "deepcluster_v2": "none",
    "hexa_dcluster": "deepcluster_v2.py",
    "lincls": "none",
    "finetune": "lincls.py",
}
# Flags whose meaning is the same in every script: same option strings, same help text.
SHARED = ["--arch", "--batch-size", "--momentum", "--workers", "--seed", "--device", "--amp", "--output-dir",
          "--resume", "--save-freq", "--print-freq"]  # fmt: skip


# Flags every pretraining script has, with one meaning.
PRETRAINING_SHARED = ["--views", "--knn-every", "--compile"]


def actions(name):
    parser = importlib.import_module(name).get_args_parser()
    return {next((o for o in a.option_strings if o.startswith("--")), a.dest): a for a in parser._actions}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_docstring_help_and_method_name(name):
    mod = importlib.import_module(name)
    assert f"Base: {SCRIPTS[name]}" in mod.__doc__
    assert mod.METHOD == name
    help_text = mod.get_args_parser().format_help()
    assert "--output-dir" in help_text and f"runs/{name}" in help_text


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - {"moco_v2"}))
def test_shared_flags_read_the_same(name):
    ref, flags = actions("moco_v2"), actions(name)
    for flag in SHARED:
        assert flag in flags, f"{name} lacks {flag}"
        a, b = ref[flag], flags[flag]
        assert a.option_strings == b.option_strings and type(a) is type(b), flag
        if flag not in ("--batch-size", "--momentum", "--output-dir"):  # their defaults differ by script
            assert a.help == b.help and a.default == b.default, flag


@pytest.mark.parametrize("name", ["mochi", "hexa_moco", "deepcluster_v2", "hexa_dcluster"])
def test_pretraining_flags_read_the_same(name):
    ref, flags = actions("moco_v2"), actions(name)
    for flag in PRETRAINING_SHARED:
        a, b = ref[flag], flags[flag]
        assert a.option_strings == b.option_strings and a.help == b.help and a.default == b.default, flag
        assert a.choices == b.choices, flag


@pytest.mark.parametrize("name", ["moco_v2", "deepcluster_v2"])
def test_compile_keeps_modules_and_checkpoint_keys(name):
    """--compile compiles the encoders in place (nn.Module.compile): the model's modules, parameters and state_dict
    keys, hence the checkpoints, are those of the eager model. (A cold compile of a tiny MoCo v2 step took 87 s on
    two busy CPU cores, so the compiled step is compared with the eager one on a GPU: benchmarks/gpu_check.sh.)"""
    mod = importlib.import_module(name)
    if name == "moco_v2":
        eager, compiled = (mod.MoCo("resnet18", dim=8, K=16) for _ in range(2))
        compiled.encoder_q.compile(), compiled.encoder_k.compile()
        parts = [compiled.encoder_q, compiled.encoder_k]
    else:
        eager, compiled = (mod.DeepClusterV2("resnet18", 8, 16, [4]) for _ in range(2))
        compiled.backbone.compile()
        parts = [compiled.backbone]
    assert all(p._compiled_call_impl is not None for p in parts)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert mod.get_args_parser().parse_args(["DATA", "--compile"]).compile
