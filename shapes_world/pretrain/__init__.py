"""Pretraining of the four shapes-world models (reward CLIP, reward BLIP2-ITM, evaluator CLIP,
captioner), each from a fixed seed, on CPU. ``python -m shapes_world.pretrain`` rebuilds them."""
