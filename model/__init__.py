"""DALL·E mini in JAX/Flax: text -> DalleBart image codes -> VQGAN pixels -> CLIP reranking."""
