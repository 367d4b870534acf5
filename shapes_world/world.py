"""Scenes, rendering and text of the shapes world.

A scene holds 1..4 objects, each with a shape, colour, size and a cell of a 3x3 grid, on a
background colour. Everything is a pure function of a ``numpy.random.Generator``, so a split is
reproducible from its seed.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
SIZES = ("small", "large")
# Row-major 3x3 grid: index = 3 * row + col.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
MAX_OBJECTS = 4
# An object's radius as a share of its grid cell's side.
RADIUS = {"small": 0.2, "large": 0.42}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
PLURALS = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]  # sorted by grid position

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(d["background"], tuple(SceneObject(**o) for o in d["objects"]))


def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(rng.choice(len(POSITIONS), size=n, replace=False).tolist())
    objects = tuple(
        SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            color=list(COLORS)[rng.integers(len(COLORS))],
            size=SIZES[rng.integers(len(SIZES))],
            position=POSITIONS[c],
        )
        for c in cells
    )
    return Scene(background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], objects=objects)


# ----------------------------------------------------------------------------- rendering
def render(scene: Scene, image_size: int = 64, jitter: np.random.Generator | None = None,
           radius: dict[str, float] = RADIUS) -> Image.Image:
    """Draw the scene. ``jitter`` (optional) moves objects a little inside their cell; ``radius``:
    an object's radius per size, as a share of its cell's side."""
    scale = 4  # draw large and downsample: anti-aliased edges keep small shapes recognisable
    S = image_size * scale
    img = Image.new("RGB", (S, S), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = S / 3
    for obj in scene.objects:
        idx = POSITIONS.index(obj.position)
        row, col = divmod(idx, 3)
        r = cell * radius[obj.size]
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        if jitter is not None:
            slack = cell / 2 - r
            cx += float(jitter.uniform(-0.6, 0.6)) * slack
            cy += float(jitter.uniform(-0.6, 0.6)) * slack
        _draw_shape(draw, obj.shape, cx, cy, r, COLORS[obj.color])
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------- per-cell ground truth
CELL_ATTRIBUTES = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES)}


def cell_labels(scenes: list[dict]) -> dict:
    """``{attribute: LongTensor[N, 9]}`` for scenes as dicts: the value index of the object in
    each grid cell, or ``len(values)`` ("empty") where the cell holds none."""
    import torch

    out = {a: torch.full((len(scenes), len(POSITIONS)), len(v)) for a, v in CELL_ATTRIBUTES.items()}
    for i, scene in enumerate(scenes):
        for o in scene["objects"]:
            cell = POSITIONS.index(o["position"])
            for a, values in CELL_ATTRIBUTES.items():
                out[a][i, cell] = values.index(o[a])
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- counterfactuals
PERTURBATIONS = ("shape", "color", "size", "position", "background")


def perturb_scene(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> Scene:
    """The scene with exactly one fact made false: one object's shape, colour, size or position
    (moved to an empty cell), or the background. ``kind`` (default: drawn) picks which."""
    kind = PERTURBATIONS[rng.integers(len(PERTURBATIONS))] if kind is None else kind
    if kind == "background":
        others = [b for b in BACKGROUNDS if b != scene.background]
        return Scene(others[rng.integers(len(others))], scene.objects)
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    values = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES,
              "position": tuple(p for p in POSITIONS if p not in {o.position for o in objects})}[kind]
    others = [v for v in values if v != getattr(objects[i], kind)]
    objects[i] = SceneObject(**(asdict(objects[i]) | {kind: others[rng.integers(len(others))]}))
    return Scene(scene.background, tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))


SWAPS = ("shape", "color", "size", "position")


def swap_scene(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """The scene with two objects' values of one attribute (shape, colour, size or position)
    traded: the same attributes, bound to other objects (what a bag-of-words model cannot tell
    from the truth). Drawn among the pairs of objects that differ in that attribute and in another
    one (two objects that differ in one attribute only would trade places and leave the scene as
    it was); ``None`` where there is no such pair."""
    objects = scene.objects

    def differ(a: SceneObject, b: SceneObject) -> set[str]:
        return {k for k in SWAPS if getattr(a, k) != getattr(b, k)}

    pairs = [(i, j, differ(objects[i], objects[j])) for i in range(len(objects)) for j in range(i + 1, len(objects))]
    options = [(kind, i, j) for i, j, kinds in pairs if len(kinds) >= 2 for kind in sorted(kinds)]
    if not options:
        return None
    kind, i, j = options[rng.integers(len(options))]
    swapped = list(objects)
    swapped[i] = SceneObject(**(asdict(objects[i]) | {kind: getattr(objects[j], kind)}))
    swapped[j] = SceneObject(**(asdict(objects[j]) | {kind: getattr(objects[i], kind)}))
    return Scene(scene.background, tuple(sorted(swapped, key=lambda o: POSITIONS.index(o.position))))


# ----------------------------------------------------------------------------- text
def full_description(scene: Scene) -> str:
    """The canonical complete description; unique per scene (test scenes never share one)."""
    parts = [f"a {o.size} {o.color} {o.shape} at the {o.position}" for o in scene.objects]
    return f"{_join(parts)} on a {scene.background} background"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_counts(scene: Scene) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in scene.objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1
    return counts


def _counted(shape: str, n: int, modifier: str = "") -> str:
    mod = f"{modifier} " if modifier else ""
    if n == 1:
        return f"{_article(mod or shape)} {mod}{shape}"
    return f"{NUMBER_WORDS[n]} {mod}{PLURALS[shape]}"


def human_caption(scene: Scene, rng: np.random.Generator, p_color: float = 0.2,
                  p_size: float = 0.25, p_position: float = 0.1, p_second_detail: float = 0.15,
                  p_background: float = 0.1) -> str:
    """A short, biased caption: shapes and counts; colours, sizes, positions only sometimes.

    Whatever it says is true of the scene (the bias is omission, not error), so a captioner
    trained on these learns grounded colour/size/position words it rarely uses. A detailed
    caption gives one kind of detail per object, now and then a second kind
    (``p_second_detail``) and the background (``p_background``): rare, as in COCO, but a mode
    the captioner can sample and RL can make common.
    """
    n = len(scene.objects)
    style = rng.random()
    if style < 0.2:
        noun = ("shapes", "objects")[rng.integers(2)]
        return f"{NUMBER_WORDS[n]} {noun}" if n > 1 else f"a single {scene.objects[0].shape}"
    if style < 0.3 and n > 1:
        return f"some shapes on a {scene.background} background" if rng.random() < 0.3 else "some shapes"
    p_detail = np.array([p_color, p_size, p_position])
    if rng.random() < p_detail.sum():
        kinds = ["color", "size", "position"]
        chosen = {kinds[rng.choice(3, p=p_detail / p_detail.sum())]}
        if rng.random() < p_second_detail:
            chosen.add(kinds[rng.choice(3, p=p_detail / p_detail.sum())])
        parts = []
        for o in scene.objects:
            words = [o.size] if "size" in chosen else []
            words += [o.color] if "color" in chosen else []
            phrase = " ".join(words + [o.shape])
            phrase = f"{_article(phrase)} {phrase}"
            parts.append(phrase + (f" at the {o.position}" if "position" in chosen else ""))
        text = _join(parts)
        return text + f" on a {scene.background} background" if rng.random() < p_background else text
    counts = _shape_counts(scene)
    return _join([_counted(s, c) for s, c in counts.items()])


POSITION_SYNONYMS = {
    "top left": ["top left", "upper left"], "top": ["top", "top middle"],
    "top right": ["top right", "upper right"], "left": ["left", "middle left"],
    "center": ["center", "middle"], "right": ["right", "middle right"],
    "bottom left": ["bottom left", "lower left"], "bottom": ["bottom", "bottom middle"],
    "bottom right": ["bottom right", "lower right"],
}


def alt_text(scene: Scene, rng: np.random.Generator) -> str:
    """A complete description in one of several phrasings (colours, sizes, positions, counts)."""
    objs = list(scene.objects)
    if rng.random() < 0.5:
        rng.shuffle(objs)
    n = len(objs)

    def pos(o):
        syn = POSITION_SYNONYMS[o.position]
        return syn[rng.integers(len(syn))]

    style = int(rng.integers(4))
    if style == 0:
        parts = [f"{_article(o.size)} {o.size} {o.color} {o.shape} at the {pos(o)}" for o in objs]
        text = f"{_join(parts)} on a {scene.background} background"
    elif style == 1:
        noun = "shape" if n == 1 else "shapes"
        parts = [f"{_article(o.size)} {o.size} {o.color} {o.shape} in the {pos(o)}" for o in objs]
        text = f"{NUMBER_WORDS[n]} {noun} on {scene.background}: {_join(parts)}"
    elif style == 2:
        parts = [f"{o.color} {o.shape}, {o.size}, {pos(o)}" for o in objs]
        text = f"{scene.background} background with {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'}; " + "; ".join(parts)
    else:
        parts = [f"at the {pos(o)} {_article(o.size)} {o.size} {o.color} {o.shape}" for o in objs]
        text = f"a {scene.background} picture with " + _join(parts)
    return text


def counterfactual_texts(scenes: list[dict], k: int, seed: int, kinds: tuple[str, ...] | None = None,
                         binding: bool = False) -> tuple[list[list[str]], list[list[str]]]:
    """For each scene (as a dict), ``k`` pairs of alt-texts in the same phrasing: one true, one of
    the scene with a single fact made false (``perturb_scene``; ``kinds``, default all of
    ``PERTURBATIONS``, are the facts drawn from) or, with ``binding``, with two objects' values
    traded (``swap_scene``; a single fact made false where nothing can be traded). Both texts of a
    pair come from the same random stream, so they share their phrasing and differ in that fact
    (where a moved object changes the order of the objects, also in which position synonyms are
    drawn): a model trained to tell them apart cannot do it by style."""
    rng = np.random.default_rng(seed)
    pos, neg = [], []
    for d in scenes:
        scene = Scene.from_dict(d)
        seeds = rng.integers(2**32, size=k)
        pos.append([alt_text(scene, np.random.default_rng(s)) for s in seeds])
        neg.append([alt_text(_counterfactual(scene, rng, kinds, binding), np.random.default_rng(s)) for s in seeds])
    return pos, neg


def _counterfactual(scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] | None, binding: bool) -> Scene:
    swapped = swap_scene(scene, rng) if binding else None
    if swapped is not None:
        return swapped
    return perturb_scene(scene, rng, None if kinds is None else kinds[rng.integers(len(kinds))])
