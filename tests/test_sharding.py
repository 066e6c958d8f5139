"""Several devices give the same images as one (4 forced CPU devices, in a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.sharding import dalle_bart_partition_specs
from tests.tiny import write_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = write_tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    out = subprocess.run([sys.executable, "-m", "tests.multi_device_check", str(folder)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_are_used(report):
    assert report["devices"] == 4


def test_data_parallel_gives_the_same_images(report):
    assert report["data"]["codes_equal"] and report["data"]["pixels_equal"]
    assert report["data"]["score_diff"] < 1e-4


def test_model_parallel_matches_the_unsharded_run(report):
    assert report["model_parallel_logits_rel_err"] < 1e-5
    assert report["data_model"]["codes_equal"]
    assert report["data_model"]["score_diff"] < 1e-4
    assert "model" in report["sharded_param_example"]


def test_partition_rules_cover_the_published_tree():
    from model.checkpoint import dalle_bart_param_shapes

    specs = dalle_bart_partition_specs(dalle_bart_param_shapes({"d_model": 1024, "encoder_ffn_dim": 2730,
                                                                "decoder_ffn_dim": 2730}))
    layers = specs["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
    assert tuple(layers["FlaxBartAttention_0"]["q_proj"]["kernel"]) == (None, None, "model")
    assert tuple(layers["GLU_0"]["Dense_2"]["kernel"]) == (None, "model", None)
    assert tuple(specs["model"]["encoder"]["embed_tokens"]["embedding"]) == ("model", None)
    assert tuple(layers["LayerNorm_1"]["scale"]) == ()
