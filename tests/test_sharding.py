"""Several devices give the same images as one, with rows and weights really spread over them (4 forced
CPU devices, in a subprocess: tests/multi_device_check.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.bart import DalleBartConfig
from model.sharding import dalle_bart_partition_specs
from support.tiny import write_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = write_tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    out = subprocess.run([sys.executable, "-m", "tests.multi_device_check", str(folder)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_parallel_splits_rows_four_ways_and_gives_the_same_images(report):
    data = report["data"]
    assert data["row_pieces"] == [4], "every array placed for a call must have its rows split over the 4 devices"
    assert data["decoder_matrix_split"] == 1.0  # weights replicated: each device holds all of them
    assert data["codes_equal"] and data["pixels_equal"]
    assert data["score_diff"] < 1e-4


def test_model_parallel_halves_the_weights_and_matches_the_unsharded_run(report):
    both = report["data_model"]
    assert both["row_pieces"] == [2]  # 2 data groups of 2 devices
    # Each device of a model pair holds half of every decoder matrix the pipeline samples with.
    assert both["decoder_matrix_split"] == 0.5
    assert report["split_attention_kernel_split"] == 0.5
    assert report["model_parallel_logits_rel_err"] < 1e-5
    assert both["codes_equal"]
    assert both["score_diff"] < 1e-4


def test_partition_rules_cover_the_published_tree():
    from model.checkpoint import dalle_bart_param_shapes

    specs = dalle_bart_partition_specs(dalle_bart_param_shapes(DalleBartConfig.mini().to_dict()))
    layers = specs["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
    assert tuple(layers["FlaxBartAttention_0"]["q_proj"]["kernel"]) == (None, None, "model")
    assert tuple(layers["GLU_0"]["Dense_2"]["kernel"]) == (None, "model", None)
    assert tuple(specs["model"]["encoder"]["embed_tokens"]["embedding"]) == ("model", None)
    assert tuple(layers["LayerNorm_1"]["scale"]) == ()
