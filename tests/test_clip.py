"""CLIP parity against transformers' PyTorch CLIPModel (the independent reference), conversion and config checks."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from model.clip import (
    CLIP,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    params_from_torch_state_dict,
    params_to_torch_state_dict,
)
from model.errors import CheckpointError, UnsupportedOptionError

VOCAB = 100
BOS, LEGACY_EOT = 98, 99  # OpenAI layout: end-of-text is the largest id


def tiny_config(hidden_act: str, eos_token_id: int, text_eps: float = 1e-5, vision_eps: float = 1e-5) -> CLIPConfig:
    # Towers of different widths, depths and head sizes so that swapped configs cannot pass.
    text = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, hidden_act=hidden_act, layer_norm_eps=text_eps, eos_token_id=eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=40, intermediate_size=72, num_attention_heads=5, num_hidden_layers=3, image_size=32,
        patch_size=8, num_channels=3, hidden_act=hidden_act, layer_norm_eps=vision_eps,
    )
    return CLIPConfig(text, vision, projection_dim=24, logit_scale_init_value=1.7)


def reference_checkpoint(config: CLIPConfig, folder, seed: int):
    """A random transformers CLIPModel saved with save_pretrained, every bias and LayerNorm perturbed so that
    eps, bias and scale mistakes show. Returns (torch model, config.json dict, safetensors state dict)."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config.to_dict())).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.mul_(1 + 0.3 * torch.randn_like(parameter))
            elif name.endswith("bias") or name == "logit_scale":
                parameter.add_(0.3 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return model, json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


def texts(eot: int, rng: np.random.Generator):
    """[3, 12] ids and mask: a row right-padded with the eot id (as CLIP's tokenizer pads), one left-padded with 0
    (so the padding mask matters under the causal one), and a full row."""
    length = 12
    words = [w for w in range(3, BOS) if w != eot]
    rows, masks = [], []
    for left, used in ((0, 7), (4, 8), (0, 12)):
        row = [BOS, *rng.choice(words, used - 2), eot]
        right = length - left - used
        rows.append([0] * left + row + [eot] * right)
        masks.append([0] * left + [1] * used + [0] * right)
    return np.array(rows, np.int64), np.array(masks, np.int64)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours - reference)) / max(1.0, np.max(np.abs(reference))))


@pytest.mark.parametrize(
    "hidden_act, eos_token_id, eps",
    [
        # OpenAI layout: legacy eos id 2 means "pool at argmax(input_ids)", the eot being the largest id.
        ("quick_gelu", 2, (1e-5, 1e-5)),
        # A real eos id 7, below the other tokens' ids: pool at its first position, not at the argmax.
        ("gelu", 7, (1e-3, 1e-4)),
    ],
)
def test_matches_transformers(tmp_path, hidden_act, eos_token_id, eps):
    config = tiny_config(hidden_act, eos_token_id, *eps)
    reference, config_json, state = reference_checkpoint(config, tmp_path, seed=eos_token_id)
    assert CLIPConfig.from_dict(config_json) == config
    params = params_from_torch_state_dict(state, config)

    rng = np.random.default_rng(0)
    eot = LEGACY_EOT if eos_token_id == 2 else eos_token_id
    input_ids, attention_mask = texts(eot, rng)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)  # NCHW for torch
    text_inputs = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    with torch.no_grad():
        expected = reference(**text_inputs, pixel_values=torch.from_numpy(pixels))
        text_features = reference.get_text_features(**text_inputs).pooler_output
        image_features = reference.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output

    module = CLIP(config)
    variables = {"params": params}
    ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    nhwc = pixels.transpose(0, 2, 3, 1)
    out = jax.jit(module.apply)(variables, ids, nhwc, mask)
    text_features_ours = module.apply(variables, ids, mask, method=CLIP.get_text_features)
    errors = {
        "text_embeds": relative_error(out["text_embeds"], expected.text_embeds),
        "image_embeds": relative_error(out.image_embeds, expected.image_embeds),
        "logits_per_image": relative_error(out.logits_per_image, expected.logits_per_image),
        "logits_per_text": relative_error(out["logits_per_text"], expected.logits_per_text),
        "text_features": relative_error(text_features_ours, text_features),
        "image_features": relative_error(module.apply(variables, nhwc, method="get_image_features"), image_features),
    }
    print(hidden_act, errors)
    assert max(errors.values()) <= 1e-5, errors


def test_state_dict_round_trip(tmp_path):
    config = tiny_config("quick_gelu", 2)
    _, _, state = reference_checkpoint(config, tmp_path, seed=1)
    back = params_to_torch_state_dict(params_from_torch_state_dict(state, config))
    assert set(back) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    fresh = transformers.CLIPModel(transformers.CLIPConfig.from_dict(config.to_dict()))
    fresh.load_state_dict({name: torch.from_numpy(value) for name, value in back.items()}, strict=True)


def test_mismatched_state_dict_is_named(tmp_path):
    config = tiny_config("quick_gelu", 2)
    _, _, state = reference_checkpoint(config, tmp_path, seed=2)
    broken = dict(state, extra=np.zeros(1, np.float32))
    del broken["text_model.final_layer_norm.bias"]
    broken["visual_projection.weight"] = broken["visual_projection.weight"].T
    with pytest.raises(CheckpointError) as error:
        params_from_torch_state_dict(broken, config)
    message = str(error.value)
    assert "missing text_model.final_layer_norm.bias" in message
    assert "visual_projection.weight has shape (40, 24), expected (24, 40)" in message
    assert "unexpected extra" in message


# openai/clip-vit-base-patch32's config.json, abridged to the keys that shape the model.
BASE_PATCH32 = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 512,
    "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12,
                    "max_position_embeddings": 77, "vocab_size": 49408, "eos_token_id": 2, "bos_token_id": 0,
                    "pad_token_id": 1, "hidden_act": "quick_gelu", "dropout": 0.0},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                      "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu"},
}


def test_base_patch32_shapes_and_parameter_count():
    config = CLIPConfig.from_dict(BASE_PATCH32)
    assert config.text_config.eos_token_id == 2 and config.vision_config.layer_norm_eps == 1e-5
    module = CLIP(config)
    ids = jax.ShapeDtypeStruct((3, 77), jnp.int32)
    pixels = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), ids, pixels, ids)["params"]
    out = jax.eval_shape(module.apply, {"params": params}, ids, pixels, ids)
    assert out.text_embeds.shape == (3, 512) and out.image_embeds.shape == (2, 512)
    assert out.logits_per_image.shape == (2, 3) and out.logits_per_text.shape == (3, 2)
    assert params["text_model"]["encoder"]["layers"]["11"]["self_attn"]["q_proj"]["kernel"].shape == (512, 512)
    assert params["vision_model"]["embeddings"]["patch_embedding"]["kernel"].shape == (32, 32, 3, 768)
    assert params["vision_model"]["pre_layrnorm"]["scale"].shape == (768,)
    assert params["logit_scale"].shape == ()

    ours = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
    with torch.device("meta"):
        reference = transformers.CLIPModel(transformers.CLIPConfig.from_dict(BASE_PATCH32))
    assert ours == sum(p.numel() for p in reference.parameters())
    assert 151.2e6 < ours < 151.4e6


def test_config_round_trips_through_transformers():
    config = tiny_config("gelu", 7, 1e-3, 1e-4)
    hf = transformers.CLIPConfig.from_dict(config.to_dict())
    assert hf.text_config.eos_token_id == 7 and hf.vision_config.layer_norm_eps == 1e-4 and hf.projection_dim == 24
    assert CLIPConfig.from_dict(hf.to_dict()) == config
    # Legacy files carry text_config_dict, which HF lets override text_config.
    legacy = dict(BASE_PATCH32, text_config_dict={"hidden_act": "gelu"})
    assert CLIPConfig.from_dict(legacy).text_config.hidden_act == "gelu"
    assert CLIPConfig.from_dict({}) == CLIPConfig()


def test_unsupported_activation_is_refused():
    bad = dict(BASE_PATCH32, vision_config=dict(BASE_PATCH32["vision_config"], hidden_act="mish"))
    with pytest.raises(UnsupportedOptionError, match=r"vision_config\.hidden_act='mish'"):
        CLIPConfig.from_dict(bad)
