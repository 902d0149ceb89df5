"""Lazy recipes: each primitive, equality with an independent eager conversion, and plan-time errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds_loader import (
    ConvertedSource,
    Recipe,
    RecipeError,
    drop,
    fuse,
    rename,
    reshape,
    rule,
    split,
    strip_prefix,
    swap_halves,
)
from ds_loader.recipes import Concat, Key
from ds_vram.sources import SafetensorsSource, TensorInfo, WeightSource


class DictSource:
    """An in-memory WeightSource that counts reads, to show that planning reads no tensor."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.reads: list[str] = []

    def keys(self):
        return iter(self.tensors)

    def __contains__(self, key):
        return key in self.tensors

    def info(self, key):
        return TensorInfo(self.tensors[key].dtype, tuple(self.tensors[key].shape))

    def get(self, key):
        self.reads.append(key)
        return self.tensors[key]


def test_lazy_recipe_equals_eager_conversion(tiny, files):
    eager = tiny.from_diffusers(load_file(files.diffusers_file))
    source = SafetensorsSource(files.diffusers_file)
    converted = tiny.diffusers_recipe.apply(source)
    assert isinstance(converted, WeightSource) and isinstance(converted, ConvertedSource)
    assert source._maps == [None]  # planning read headers only
    assert set(converted.keys()) == set(eager) == set(files.state)
    for key in eager:
        assert converted.info(key) == TensorInfo(eager[key].dtype, tuple(eager[key].shape)), key
        torch.testing.assert_close(converted.get(key), eager[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(converted.get(key), files.state[key], rtol=0, atol=0, msg=key)


def test_each_target_reads_only_its_own_sources():
    tensors = {f"t.to_{p}.weight": torch.full((2, 3), float(i)) for i, p in enumerate("qkv")}
    tensors["other.weight"] = torch.zeros(1)
    source = DictSource(tensors)
    converted = Recipe(fuse(r"t\.to_(?P<part>q|k|v)\.weight", "t.qkv.weight", "qkv")).apply(source)
    assert source.reads == []
    assert converted.sources_of("t.qkv.weight") == ("t.to_q.weight", "t.to_k.weight", "t.to_v.weight")
    assert converted.info("t.qkv.weight").shape == (6, 3)
    assert converted.get("t.qkv.weight")[:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert source.reads == ["t.to_q.weight", "t.to_k.weight", "t.to_v.weight"]
    converted.get("other.weight")
    assert source.reads[-1] == "other.weight"


def test_primitives():
    x = torch.arange(24.0).reshape(6, 4)
    source = DictSource({"model.a": x, "model.b": x.clone(), "ada.w": x, "pos": x, "skip.me": x, "qkv": x})
    converted = Recipe(
        strip_prefix("model.", "net."),
        swap_halves(r"ada\.w", "ada.swapped", dim=0),
        reshape("pos", "pos.flat", (24,)),
        split("qkv", ["q", "k", "v"]),
        drop(r"skip\..*"),
    ).apply(source)
    assert sorted(converted.keys()) == ["ada.swapped", "k", "net.a", "net.b", "pos.flat", "q", "v"]
    torch.testing.assert_close(converted.get("ada.swapped"), torch.cat([x[3:], x[:3]]))
    assert converted.info("pos.flat").shape == (24,)
    torch.testing.assert_close(converted.get("k"), x[2:4])
    assert converted.get("k").data_ptr() == x[2:4].data_ptr()  # a slice is a view, never a copy
    assert converted.get("net.a") is x  # a rename hands out the source tensor itself
    uneven = Recipe(split("qkv", ["a", "b"], dim=1, sizes=[1, 3])).apply(DictSource({"qkv": x}))
    assert uneven.info("b").shape == (6, 3)


def test_plan_and_info_errors_name_the_keys():
    x = torch.zeros(3, 4)
    with pytest.raises(RecipeError, match=r"recipe maps both \('a',\) and \('b',\) to 'c'"):
        Recipe(rename("a", "c"), rename("b", "c")).plan(DictSource({"a": x, "b": x}))
    with pytest.raises(RecipeError, match=r"cannot split qkv \(size 3 on dim 0\) into parts \[1, 1\]"):
        Recipe(split("qkv", ["a", "b"], sizes=[1, 1])).plan(DictSource({"qkv": x}))
    bad_reshape = Recipe(reshape("a", "b", (5,))).apply(DictSource({"a": x}))
    with pytest.raises(RecipeError, match=r"cannot reshape \('a',\) \(3, 4\) to \(5,\)"):
        bad_reshape.info("b")
    odd = Recipe(swap_halves("a", "b")).apply(DictSource({"a": x}))
    with pytest.raises(RecipeError, match=r"cannot swap halves of \('a',\) \(3, 4\): dim 0 is odd"):
        odd.info("b")
    mixed = ConvertedSource(DictSource({"a": x, "b": x.half()}), {"c": Concat((Key("a"), Key("b")))})
    with pytest.raises(RecipeError, match=r"cannot concatenate along dim 0: a torch.float32 .* b torch.float16"):
        mixed.info("c")
    with pytest.raises(KeyError, match=r"'nope' is not produced"):
        mixed.get("nope")
    with pytest.raises(ValueError, match=r"needs a named group \(\?P<part>"):
        fuse("a(b)", "c", ["b"])


def test_rule_sees_header_shapes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"embed": torch.zeros(1, 7, 5)}, path)
    recipe = Recipe(rule("embed", lambda m, keys: {"e": Key(m.string)} if keys.info(m.string).shape[0] == 1 else {}))
    assert list(recipe.apply(SafetensorsSource(path)).keys()) == ["e"]
