"""CLIP reranking of generated images: scores against their own prompt, or against a reference image.

The pipeline samples more candidates than it returns and keeps the best by these scores. Two scales,
so results say which one they carry (`GenerationResult.score_kind`):
- "clip_logit": CLIP's logit, 100 x the cosine of text and image embeddings (higher = closer to the prompt);
- "image_similarity": the cosine of two image embeddings, -1..1 (variations without a prompt).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from model import sharding, xla_options
from model.text import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess, clip_tokenize

SCORE_LABELS = {"clip_logit": "CLIP score", "image_similarity": "similarity to the upload"}


def float32_params(params):
    """Weights stored in half precision (load_pipeline's dtype), widened inside a jitted call: CLIP and
    the VQGAN compute in float32 (a no-op for float32 weights), so only the weights are rounded."""
    return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  params)


class Reranker:
    """Scores images with a CLIP model; rows are padded to sharding's buckets so shapes repeat."""

    def __init__(self, clip, params, tokenizer, *, image_size=None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                 mesh=None):
        self.config = clip.config
        self.tokenizer = tokenizer
        self.image_size = image_size or clip.config.vision_config.image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.mesh = mesh
        self.params = sharding.place_params(params, mesh)
        jit = functools.partial(jax.jit, compiler_options=xla_options.compiler_options())
        self._logits = jit(lambda p, ids, mask, x: clip.apply({"params": float32_params(p)}, ids, x, mask).logits_per_image)
        self._image_features = jit(lambda p, x: clip.apply({"params": float32_params(p)}, x, method="get_image_features"))

    def logits(self, prompts, images) -> np.ndarray:
        """CLIP logits [n_images, n_prompts] of images (PIL or uint8 [H, W, 3]) against prompts."""
        ids, mask = clip_tokenize(self.tokenizer, prompts, self.config.text_config.max_position_embeddings)
        logits = sharding.to_host(self._logits(self.params, jnp.asarray(ids), jnp.asarray(mask),
                                               self._pixel_values(list(images))))
        return logits[: len(images)]

    def by_prompt(self, prompts, pixels: np.ndarray, per_prompt: int) -> np.ndarray:
        """CLIP logit of every image [P * per_prompt] against its own prompt (images grouped by prompt)."""
        own_prompt = np.arange(len(pixels)) // per_prompt
        return self.logits(prompts, pixels)[np.arange(len(pixels)), own_prompt]

    def by_image(self, reference: Image.Image, pixels: np.ndarray) -> np.ndarray:
        """Cosine similarity of CLIP image embeddings: each of `pixels` [n, H, W, 3] vs `reference`."""
        features = sharding.to_host(self._image_features(self.params, self._pixel_values([reference, *pixels])))
        features = features / np.linalg.norm(features, axis=-1, keepdims=True)
        return features[1: len(pixels) + 1] @ features[0]

    def _pixel_values(self, images) -> jax.Array:
        values = clip_preprocess(images, self.image_size, self.mean, self.std)
        padded = sharding.bucket_rows(len(values), sharding.data_size(self.mesh))
        values = np.concatenate([values, np.repeat(values[-1:], padded - len(values), axis=0)])
        return sharding.shard_rows(jnp.asarray(values), self.mesh)
