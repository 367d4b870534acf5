"""The shapes world: the offline default of the project.

A synthetic, seed-deterministic image world with ground truth, biased "human" captions
(the COCO analogue) and complete "alt-text" (the web analogue CLIP learns from), plus the
code that pretrains the four tiny models on it (see ``shapes_world.pretrain``).
"""
