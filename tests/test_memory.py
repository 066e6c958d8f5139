"""Memory known before loading (model/memory.py) and load_pipeline's refusal of a model that will not fit."""

import jax
import pytest

from model import loading, memory
from model.bart import DalleBartConfig
from model.checkpoint import read_config
from model.clip import CLIPConfig
from model.errors import CheckpointError
from model.loading import load_pipeline
from model.vqgan import VQGANConfig
from support.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _configs(folder):
    return (DalleBartConfig.from_dict(read_config(folder / "bart")), VQGANConfig.from_dict(read_config(folder / "vqgan")),
            CLIPConfig.from_dict(read_config(folder / "clip")))


class FakeGPU:
    """A device description as jax gives it, with a chosen amount of free memory."""

    platform = "gpu"
    compute_capability = "7.5"

    def __init__(self, free_bytes):
        self.free = free_bytes

    def memory_stats(self):
        return {"bytes_limit": self.free + 1000, "bytes_in_use": 1000}


def _device_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_weight_bytes_are_what_the_loaded_pipeline_holds(tiny, dtype):
    need = memory.estimate(*_configs(tiny), dtype, images=4, measure=False)
    pipe = load_pipeline(tiny, dtype=dtype, compilation_cache=False)
    held = {"bart": _device_bytes(pipe.bart_params), "vqgan": _device_bytes(pipe.vqgan_params),
            "clip": _device_bytes(pipe.reranker.params)}
    assert need.parts["weights"] == held
    assert pipe.dtype == dtype


def test_half_precision_halves_the_weights_and_cache():
    mini = DalleBartConfig.mini(encoder_layers=2, decoder_layers=2)
    full = memory.estimate(mini, VQGANConfig(), CLIPConfig(), "float32", images=9, measure=False)
    half = memory.estimate(mini, VQGANConfig(), CLIPConfig(), "bfloat16", images=9, measure=False)
    assert full.decoder_rows == 18
    assert 0.5 <= half.cache / full.cache < 0.501, half.cache / full.cache  # the text mask is bool
    # Vectors (norms, biases) stay float32: a little over half.
    assert 0.5 < half.weights / full.weights < 0.51, half.weights / full.weights


@pytest.mark.parametrize("images", [1, 9])
def test_shape_bound_covers_xla_temporaries(tiny, images):
    """load_pipeline's check uses the bound: it must not be below what XLA reports for any stage."""
    measured = memory.estimate(*_configs(tiny), "float16", images=images)
    bound = memory.estimate(*_configs(tiny), "float16", images=images, measure=False)
    for stage, value in measured.parts["temporaries"].items():
        assert 0 < value <= bound.parts["temporaries"][stage], (stage, value, bound.parts["temporaries"][stage])
    assert bound.weights == measured.weights and bound.cache == measured.cache


def test_load_refuses_a_model_that_does_not_fit_before_reading_weights(tiny, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the memory check")

    monkeypatch.setattr(loading, "load_dalle_bart", no_load)
    monkeypatch.setattr(loading.jax, "devices", lambda *args: [FakeGPU(free_bytes=100_000)])
    with pytest.raises(CheckpointError) as error:
        load_pipeline(tiny, compilation_cache=False)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("tiny at float16 needs ~") and "4 images" in message and "GPU has 0.0 GB free" in message


def test_check_passes_when_memory_suffices_and_is_skipped_without_stats(tiny):
    folders = {stage: tiny / stage for stage in ("bart", "vqgan", "clip")}
    defaults = loading._defaults(loading._read_pipeline_file(tiny), tiny)
    loading.check_fits(folders, "float16", defaults, "tiny", FakeGPU(free_bytes=10**9))
    need = memory.estimate(*_configs(tiny), "float16", images=4, measure=False).total
    with pytest.raises(CheckpointError, match=r"needs ~0\.0 GB for 4 images"):
        loading.check_fits(folders, "float16", defaults, "tiny", FakeGPU(free_bytes=need - 1))
    # A device that reports no memory (the CPU) is not checked, however little it would have.
    loading.check_fits(folders, "float16", defaults, "tiny", type("CPU", (), {"platform": "cpu",
                                                                               "memory_stats": lambda self: None})())
