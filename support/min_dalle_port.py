"""Our parameter trees as min-dalle (PyTorch) modules: the independent reference for parity tests
and the baseline of the speed benchmark, run on the same weights.

State dicts are plain numpy arrays, so they can be written with safetensors and loaded by a
process that never imports JAX; `build_*` turns them into min-dalle's modules. min-dalle's
Linear weights are [out, in] (our kernels are [in, out]), its norms always have a weight
(upstream's bias-only norms get scale 1), and its decoder has a fixed 256 positions.
"""

import numpy as np

# min-dalle hard-wires 256 decoder positions (and a batch of 2 text rows in its encoder).
MIN_DALLE_IMAGE_POSITIONS = 256


def _array(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, np.float32))


def _norm(prefix: str, p: dict, layer: int | None = None) -> dict:
    pick = (lambda x: x) if layer is None else (lambda x: x[layer])
    bias = _array(pick(p["bias"]))
    scale = _array(pick(p["scale"])) if "scale" in p else np.ones(bias.shape, np.float32)
    return {f"{prefix}.weight": scale, f"{prefix}.bias": bias}


def _linear(kernel) -> np.ndarray:
    return _array(np.asarray(kernel).T)


def _attention(prefix: str, p: dict, layer: int) -> dict:
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    return {f"{prefix}.{name}.weight": _linear(p[name]["kernel"][layer]) for name in names}


def _glu(prefix: str, p: dict, layer: int) -> dict:
    return {
        **_norm(f"{prefix}.ln0", p["LayerNorm_0"], layer),
        f"{prefix}.fc0.weight": _linear(p["Dense_0"]["kernel"][layer]),
        f"{prefix}.fc1.weight": _linear(p["Dense_1"]["kernel"][layer]),
        **_norm(f"{prefix}.ln1", p["LayerNorm_1"], layer),
        f"{prefix}.fc2.weight": _linear(p["Dense_2"]["kernel"][layer]),
    }


def encoder_state_dict(params: dict, config) -> dict[str, np.ndarray]:
    """DalleBart params (upstream's scanned tree) -> min-dalle DalleBartEncoder state dict."""
    p = params["model"]["encoder"]
    layers = p["layers"]["FlaxBartEncoderLayers"]
    state = {
        "embed_tokens.weight": _array(p["embed_tokens"]["embedding"]),
        "embed_positions.weight": _array(p["embed_positions"]["embedding"]),
        **_norm("layernorm_embedding", p["layernorm_embedding"]),
        **_norm("final_ln", p["final_ln"]),
    }
    for i in range(config.encoder_layers):
        state.update(_norm(f"layers.{i}.pre_self_attn_layer_norm", layers["LayerNorm_0"], i))
        state.update(_attention(f"layers.{i}.self_attn", layers["FlaxBartAttention_0"], i))
        state.update(_norm(f"layers.{i}.self_attn_layer_norm", layers["LayerNorm_1"], i))
        state.update(_glu(f"layers.{i}.glu", layers["GLU_0"], i))
    return state


def decoder_state_dict(params: dict, config) -> dict[str, np.ndarray]:
    """DalleBart params -> min-dalle DalleBartDecoder state dict. Position rows past
    config.image_length (small test configs) are random filler that our sequences never reach."""
    p = params["model"]["decoder"]
    layers = p["layers"]["FlaxBartDecoderLayers"]
    positions = _array(p["embed_positions"]["embedding"])
    filler_shape = (MIN_DALLE_IMAGE_POSITIONS - len(positions), config.d_model)
    filler = np.random.default_rng(7).standard_normal(filler_shape).astype(np.float32)
    state = {
        "embed_tokens.weight": _array(p["embed_tokens"]["embedding"]),
        "embed_positions.weight": np.concatenate([positions, filler]),
        **_norm("layernorm_embedding", p["layernorm_embedding"]),
        **_norm("final_ln", p["final_ln"]),
        "lm_head.weight": _linear(params["lm_head"]["kernel"]),
    }
    for i in range(config.decoder_layers):
        state.update(_norm(f"layers.{i}.pre_self_attn_layer_norm", layers["LayerNorm_0"], i))
        state.update(_attention(f"layers.{i}.self_attn", layers["FlaxBartAttention_0"], i))
        state.update(_norm(f"layers.{i}.self_attn_layer_norm", layers["LayerNorm_1"], i))
        state.update(_norm(f"layers.{i}.pre_encoder_attn_layer_norm", layers["LayerNorm_2"], i))
        state.update(_attention(f"layers.{i}.encoder_attn", layers["FlaxBartAttention_1"], i))
        state.update(_norm(f"layers.{i}.encoder_attn_layer_norm", layers["LayerNorm_3"], i))
        state.update(_glu(f"layers.{i}.glu", layers["GLU_0"], i))
    return state


def detokenizer_state_dict(vqgan_params: dict) -> dict[str, np.ndarray]:
    """VQGAN params (published size) -> min-dalle VQGanDetokenizer state dict (decoder side only;
    min-dalle names the codebook `embedding`, taming `quantize.embedding`)."""
    from model.vqgan import params_to_torch_state_dict

    side = {k: vqgan_params[k] for k in ("decoder", "post_quant_conv", "quantize")}
    state = params_to_torch_state_dict(side)
    state["embedding.weight"] = state.pop("quantize.embedding.weight")
    return state


def _load(module, state: dict):
    import torch

    # A copy: the arrays may be read-only views of a loaded file, which torch refuses to wrap.
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return module.eval()


def build_encoder(state: dict, config):
    """A min-dalle DalleBartEncoder (CPU) holding `state`."""
    from min_dalle.models import DalleBartEncoder

    return _load(DalleBartEncoder(
        layer_count=config.encoder_layers, embed_count=config.d_model,
        attention_head_count=config.encoder_attention_heads, text_vocab_count=config.encoder_vocab_size,
        text_token_count=config.max_text_length, glu_embed_count=config.encoder_ffn_dim, device="cpu",
    ), state)


def build_decoder(state: dict, config):
    """A min-dalle DalleBartDecoder (CPU) holding `state`."""
    from min_dalle.models import DalleBartDecoder

    return _load(DalleBartDecoder(
        image_vocab_count=config.image_vocab_size, embed_count=config.d_model,
        attention_head_count=config.decoder_attention_heads, glu_embed_count=config.decoder_ffn_dim,
        layer_count=config.decoder_layers, device="cpu",
    ), state)


def build_detokenizer(state: dict):
    """A min-dalle VQGanDetokenizer (published VQGAN size only) holding `state`."""
    from min_dalle.models.vqgan_detokenizer import VQGanDetokenizer

    return _load(VQGanDetokenizer(), state)


def min_dalle_encoder(params: dict, config):
    return build_encoder(encoder_state_dict(params, config), config)


def min_dalle_decoder(params: dict, config):
    return build_decoder(decoder_state_dict(params, config), config)
