"""Checkpoint folders: round trips, scanned/unscanned layers, and one clear error per kind of damage."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from model import checkpoint
from model.bart import DalleBartConfig
from model.errors import CheckpointError, UnsupportedOptionError
from support.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _flat(params):
    return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, params), sep="/")


def _assert_same(a, b):
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("stage, load, save", [
    ("bart", checkpoint.load_dalle_bart, checkpoint.save_dalle_bart),
    ("vqgan", checkpoint.load_vqgan, checkpoint.save_vqgan),
    ("clip", checkpoint.load_clip, checkpoint.save_clip),
])
def test_round_trip(folder, tmp_path, stage, load, save):
    module, params = load(folder / stage)
    save(tmp_path, module, params)
    module2, params2 = load(tmp_path)
    assert module2.config == module.config
    _assert_same(params, params2)


def test_unscanned_dalle_bart_layers_are_stacked(folder, tmp_path):
    module, params = checkpoint.load_dalle_bart(folder / "bart")
    tree = jax.tree_util.tree_map(np.asarray, params)
    for side, scanned, single in (("encoder", "FlaxBartEncoderLayers", "FlaxBartEncoderLayer"),
                                  ("decoder", "FlaxBartDecoderLayers", "FlaxBartDecoderLayer")):
        stack = tree["model"][side]["layers"].pop(scanned)
        layers = getattr(module.config, f"{side}_layers")
        for i in range(layers):
            tree["model"][side]["layers"][f"{single}_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stack)
    (tmp_path / "config.json").write_text(json.dumps(module.config.to_dict()))
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    _, restored = checkpoint.load_dalle_bart(tmp_path)
    _assert_same(params, restored)


def test_param_shapes_without_allocation():
    shapes = checkpoint.dalle_bart_param_shapes(DalleBartConfig.mini().to_dict())
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
    assert sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == 437_833_712


def _copy(folder, tmp_path, stage):
    target = tmp_path / stage
    target.mkdir()
    for file in (folder / stage).iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_missing_config(folder, tmp_path):
    target = _copy(folder, tmp_path, "vqgan")
    (target / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"Missing .*config\.json"):
        checkpoint.load_vqgan(target)


def test_missing_weights(folder, tmp_path):
    target = _copy(folder, tmp_path, "bart")
    (target / "flax_model.msgpack").unlink()
    with pytest.raises(CheckpointError, match=r"Missing .*flax_model\.msgpack"):
        checkpoint.load_dalle_bart(target)


def test_truncated_msgpack(folder, tmp_path):
    target = _copy(folder, tmp_path, "bart")
    data = (target / "flax_model.msgpack").read_bytes()
    (target / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"flax_model\.msgpack is not a readable flax msgpack file"):
        checkpoint.load_dalle_bart(target)


def _rewrite(target, edit):
    tree = serialization.msgpack_restore((target / "flax_model.msgpack").read_bytes())
    flat = traverse_util.flatten_dict(tree, sep="/")
    edit(flat)
    (target / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(traverse_util.unflatten_dict(flat, sep="/")))


def test_renamed_parameter(folder, tmp_path):
    target = _copy(folder, tmp_path, "vqgan")
    _rewrite(target, lambda flat: flat.__setitem__("quantize/embedding/codebook", flat.pop("quantize/embedding/embedding")))
    with pytest.raises(CheckpointError, match=r"missing parameter 'quantize/embedding/embedding'"):
        checkpoint.load_vqgan(target)


def test_unexpected_parameter(folder, tmp_path):
    target = _copy(folder, tmp_path, "vqgan")
    _rewrite(target, lambda flat: flat.__setitem__("extra/kernel", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected parameter 'extra/kernel'"):
        checkpoint.load_vqgan(target)


def test_misshapen_parameter(folder, tmp_path):
    target = _copy(folder, tmp_path, "bart")
    _rewrite(target, lambda flat: flat.__setitem__("lm_head/kernel", flat["lm_head/kernel"][:, :-1]))
    with pytest.raises(CheckpointError, match=r"parameter 'lm_head/kernel' has shape \(32, 32\), expected \(32, 33\)"):
        checkpoint.load_dalle_bart(target)


def test_wrong_dtype(folder, tmp_path):
    target = _copy(folder, tmp_path, "vqgan")
    _rewrite(target, lambda flat: flat.__setitem__("quant_conv/bias", flat["quant_conv/bias"].astype(np.int32)))
    with pytest.raises(CheckpointError, match=r"'quant_conv/bias' has dtype int32, expected float32"):
        checkpoint.load_vqgan(target)


def test_unsupported_option(folder, tmp_path):
    target = _copy(folder, tmp_path, "bart")
    config = json.loads((target / "config.json").read_text())
    config["use_cosine_attention"] = True
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedOptionError, match="use_cosine_attention"):
        checkpoint.load_dalle_bart(target)


def test_pickle_only_clip_is_refused(folder, tmp_path):
    target = _copy(folder, tmp_path, "clip")
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load_clip(target)


def test_unreachable_hub_says_how_to_use_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass that local folder instead"):
        checkpoint.load_vqgan("dalle-mini/vqgan_imagenet_f16_16384", revision="e93a26e7707683d349bf5d5c41c5b0ef69b677a9")


def test_not_a_folder_nor_a_repo(tmp_path):
    with pytest.raises(CheckpointError, match="No model folder"):
        checkpoint.load_clip(tmp_path / "nowhere" / "at" / "all")


def test_streamed_msgpack_reader_matches_flax(tmp_path):
    """read_msgpack parses flax's format itself (to stream it); it must agree with flax's own reader."""
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "nested": {"bf16": rng.normal(size=(4,)).astype(jnp.bfloat16), "i32": np.arange(70000, dtype=np.int32),
                   "bool": np.array([True, False]), "scalar": np.float32(2.5), "empty": np.zeros((0, 3), np.float16)},
        "long key " * 40: {"u8": np.arange(300, dtype=np.uint8).reshape(3, 100)},
        "complex": np.array([1 + 2j], np.complex64),
        "number": 3, "text": "a string", "none": None,
    }
    file = tmp_path / "tree.msgpack"
    file.write_bytes(serialization.msgpack_serialize(tree))
    ours, theirs = checkpoint.read_msgpack(file), serialization.msgpack_restore(file.read_bytes())
    flat_ours, flat_theirs = (traverse_util.flatten_dict(t, keep_empty_nodes=True) for t in (ours, theirs))
    assert flat_ours.keys() == flat_theirs.keys()
    for key, value in flat_theirs.items():
        assert type(flat_ours[key]) is type(value), key
        if isinstance(value, np.ndarray):
            assert flat_ours[key].dtype == value.dtype and flat_ours[key].shape == value.shape, key
            np.testing.assert_array_equal(flat_ours[key], value)
        else:
            assert flat_ours[key] == value, key
