"""A broken input checkpoint is refused before `merge` writes a byte: each case is one `error:` line
naming the file and the fix, exit code 1, and nothing is left next to --out."""

from __future__ import annotations

import json

import pytest

from zimage_lora import InvalidFormatError
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.tools import checkpoint_merge
from zimage_lora.tools.checkpoint import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_network")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    model = tiny_model(seed=1)
    model.save_pretrained(root / "transformer", max_shard_size="60KB")
    lora = make_adapter("kohya", root / "k.safetensors", model, rank=4)
    return root / "transformer", lora


@pytest.fixture
def ckpt(pristine, tmp_path):
    import shutil

    folder, lora = pristine
    copy = tmp_path / "in" / "transformer"
    shutil.copytree(folder, copy)
    return copy, lora


def _index(folder):
    path = next(folder.glob("*.index.json"))
    return path, json.loads(path.read_text())


def _edit_index(folder, change):
    path, doc = _index(folder)
    change(doc)
    path.write_text(json.dumps(doc))
    return path


def _edit_config(folder, change):
    path = folder / "config.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(change(doc)))
    return path


def _first_key(doc):
    return next(iter(doc["weight_map"]))


CASES = {
    "weight_map value int": (lambda f: _edit_index(f, lambda d: d["weight_map"].update({_first_key(d): 5})),
                             "is 5; expected the name of a .safetensors shard"),
    "weight_map value list": (lambda f: _edit_index(f, lambda d: d["weight_map"].update({_first_key(d): ["a"]})),
                              "is ['a']; expected the name of a .safetensors shard"),
    "weight_map shard outside": (
        lambda f: _edit_index(f, lambda d: d["weight_map"].update({_first_key(d): "../x.safetensors"})),
        "expected the name of a .safetensors shard in the same folder"),
    "index names a key no shard has": (
        lambda f: _edit_index(f, lambda d: d["weight_map"].update(
            {"layers.9.ghost.weight": next(iter(d["weight_map"].values()))})),
        "names tensor 'layers.9.ghost.weight' in"),
    "index metadata a list": (lambda f: _edit_index(f, lambda d: d.update(metadata=[1, 2])),
                              "'metadata' must be a JSON object, found list"),
    "index a list": (lambda f: next(f.glob("*.index.json")).write_text("[1]"),
                     "a shard index must be a JSON object, found list"),
    "index nested 100k deep": (lambda f: next(f.glob("*.index.json")).write_text("[" * 100_000 + "]" * 100_000),
                               "nested 100000 deep"),
    "config a list": (lambda f: (f / "config.json").write_text("[1, 2]"),
                      "the model config must be a JSON object, found list"),
    "n_heads 0": (lambda f: _edit_config(f, lambda d: {**d, "n_heads": 0}),
                  "'n_heads' is 0; expected a whole number in 1..1024"),
    "dim huge": (lambda f: _edit_config(f, lambda d: {**d, "dim": 10**30}),
                 "'dim' is 1000000000000000000000000000000; expected a whole number"),
    "n_layers a string": (lambda f: _edit_config(f, lambda d: {**d, "n_layers": "2"}),
                          "'n_layers' is '2'; expected a whole number"),
    "axes_dims huge list": (lambda f: _edit_config(f, lambda d: {**d, "axes_dims": [8] * 10_000}),
                            "'axes_dims' is [8, 8"),
    "dim not a multiple of n_heads": (lambda f: _edit_config(f, lambda d: {**d, "dim": 65}),
                                      "'dim' 65 is not a multiple of 'n_heads'"),
    "config with a 5000-digit number": (lambda f: (f / "config.json").write_text('{"dim": ' + "9" * 5000 + "}"),
                                        "a number of 5000 digits"),
    "config nested 100k deep": (lambda f: (f / "config.json").write_text('{"a": ' + "[" * 10**5 + "]" * 10**5 + "}"),
                                "nested 100001 deep"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_refused_before_writing(ckpt, tmp_path, capsys, monkeypatch, case):
    folder, lora = ckpt
    spoil, excerpt = CASES[case]
    spoil(folder)

    def tripwire(*args, **kwargs):
        raise AssertionError("a writer was opened")

    monkeypatch.setattr(checkpoint_merge, "StreamingWriter", tripwire)
    out = tmp_path / "out"
    argv = ["merge", "--model", str(folder), "--lora", str(lora), "--out", str(out), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert excerpt in err, err
    assert str(folder) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_the_pristine_checkpoint_passes_the_same_checks(ckpt):
    folder, _lora = ckpt
    opened = open_checkpoint(folder)
    assert len(opened.files) > 1 and opened.config["n_heads"] == 2
    opened.module_index()


def test_a_config_the_model_class_refuses_is_named(ckpt):
    folder, _lora = ckpt
    _edit_config(folder, lambda d: {**d, "not_a_parameter": 1})
    with pytest.raises(InvalidFormatError, match="does not build a ZImageTransformer2DModel"):
        open_checkpoint(folder).module_index()
