"""CHAIR (Rohrbach et al. 2018, "Object Hallucination in Image Captioning"): of the COCO objects a
caption mentions, the share that are not in the image.

* ``CHAIR_i`` = hallucinated object mentions / all object mentions (each object counted once per
  caption);
* ``CHAIR_s`` = captions with at least one hallucinated object / all captions.

The objects in an image are the categories of its COCO instance annotations
(``instances_val2014.json`` and the like). A caption's words are mapped to the 80 categories by a
synonym table: the built-in :data:`SYNONYMS` follows the paper's (category names, plurals and the
common words for each; two-word names such as "hot dog" matched before single words); the paper's
own ``synonyms.txt`` (one line per category: ``category, synonym, synonym, ...``) can be given
instead. Words are matched after lower-casing and a plural-to-singular rule.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["SYNONYMS", "CocoObjects", "read_synonyms"]

SYNONYMS: dict[str, list[str]] = {
    "person": ["person", "people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "kids",
               "baby", "guy", "lady", "player", "skier", "surfer", "skateboarder", "snowboarder", "rider", "pedestrian",
               "adult", "toddler", "teenager", "gentleman", "cowboy", "chef", "officer", "policeman", "worker"],
    "bicycle": ["bicycle", "bike", "cycle"], "car": ["car", "automobile", "sedan", "taxi", "suv", "van", "jeep"],
    "motorcycle": ["motorcycle", "motorbike", "motor bike", "scooter", "moped"],
    "airplane": ["airplane", "plane", "jet", "aircraft", "airliner", "jetliner"], "bus": ["bus", "trolley"],
    "train": ["train", "locomotive", "tram", "subway"], "truck": ["truck", "pickup", "lorry"],
    "boat": ["boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry"],
    "traffic light": ["traffic light", "traffic signal", "stop light", "stoplight"],
    "fire hydrant": ["fire hydrant", "hydrant"], "stop sign": ["stop sign"], "parking meter": ["parking meter", "meter"],
    "bench": ["bench"], "bird": ["bird", "duck", "seagull", "pigeon", "parrot", "goose", "swan", "gull", "owl"],
    "cat": ["cat", "kitten", "kitty"], "dog": ["dog", "puppy", "pup"], "horse": ["horse", "pony", "foal"],
    "sheep": ["sheep", "lamb", "ram"], "cow": ["cow", "cattle", "calf", "bull", "oxen"], "elephant": ["elephant"],
    "bear": ["bear"], "zebra": ["zebra"], "giraffe": ["giraffe"], "backpack": ["backpack", "knapsack"],
    "umbrella": ["umbrella", "parasol"], "handbag": ["handbag", "purse", "hand bag"], "tie": ["tie", "necktie"],
    "suitcase": ["suitcase", "luggage", "suit case"], "frisbee": ["frisbee"],
    "skis": ["skis", "ski"], "snowboard": ["snowboard"], "sports ball": ["ball", "football", "soccer ball", "baseball",
                                                                            "basketball", "tennis ball", "volleyball"],
    "kite": ["kite"], "baseball bat": ["baseball bat", "bat"], "baseball glove": ["baseball glove", "glove", "mitt"],
    "skateboard": ["skateboard", "skate board"], "surfboard": ["surfboard", "surf board"],
    "tennis racket": ["tennis racket", "racket", "racquet"], "bottle": ["bottle"],
    "wine glass": ["wine glass"], "cup": ["cup", "mug"], "fork": ["fork"], "knife": ["knife", "knives"],
    "spoon": ["spoon"], "bowl": ["bowl"], "banana": ["banana"], "apple": ["apple"], "sandwich": ["sandwich", "burger",
                                                                                                  "sub", "hamburger"],
    "orange": ["orange"], "broccoli": ["broccoli"], "carrot": ["carrot"], "hot dog": ["hot dog"], "pizza": ["pizza"],
    "donut": ["donut", "doughnut"], "cake": ["cake", "cupcake"], "chair": ["chair", "stool", "seat"],
    "couch": ["couch", "sofa"], "potted plant": ["potted plant", "plant", "houseplant"], "bed": ["bed"],
    "dining table": ["dining table", "table", "desk"], "toilet": ["toilet", "urinal"],
    "tv": ["tv", "television", "monitor", "screen"], "laptop": ["laptop", "computer", "notebook"],
    "mouse": ["mouse"], "remote": ["remote", "controller"], "keyboard": ["keyboard"],
    "cell phone": ["cell phone", "phone", "cellphone", "smartphone", "mobile phone"],
    "microwave": ["microwave"], "oven": ["oven", "stove"], "toaster": ["toaster"], "sink": ["sink"],
    "refrigerator": ["refrigerator", "fridge"], "book": ["book", "novel"], "clock": ["clock"], "vase": ["vase"],
    "scissors": ["scissors"], "teddy bear": ["teddy bear", "teddybear", "stuffed animal"],
    "hair drier": ["hair drier", "hair dryer", "hairdryer", "blow dryer"], "toothbrush": ["toothbrush", "tooth brush"],
}
_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "knives": "knife",
              "geese": "goose", "mice": "mouse", "oxen": "oxen", "skis": "skis", "scissors": "scissors"}


def read_synonyms(path: str | Path) -> dict[str, list[str]]:
    """The paper's ``synonyms.txt``: ``category, synonym, ...`` per line."""
    out: dict[str, list[str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        words = [w.strip().lower() for w in line.split(",") if w.strip()]
        if words:
            out[words[0]] = words
    return out


def _singular(word: str, known: set[str]) -> str:
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith("ies") and word[:-3] + "y" in known:  # puppies, ponies
        return word[:-3] + "y"
    for cut in ("es", "s"):
        if word.endswith(cut) and word[: -len(cut)] in known:
            return word[: -len(cut)]
    return word


class CocoObjects:
    """The objects of each image of a COCO instances file, and the COCO objects a caption names."""

    def __init__(self, instances: str | Path, synonyms: Mapping[str, Sequence[str]] | str | Path | None = None):
        path = Path(instances)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            cats = {c["id"]: c["name"] for c in data["categories"]}
            self.file_ids = {im["file_name"]: im["id"] for im in data["images"]}
            self.objects: dict[int, set[str]] = {im["id"]: set() for im in data["images"]}
            for a in data["annotations"]:
                self.objects.setdefault(a["image_id"], set()).add(cats[a["category_id"]])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a COCO instances file (images, annotations, categories): "
                             f"{type(e).__name__}: {e}") from None
        syn = read_synonyms(synonyms) if isinstance(synonyms, (str, Path)) else (synonyms or SYNONYMS)
        self.word_to_object = {w: cat for cat, words in syn.items() for w in words}
        self._known = set(self.word_to_object)
        self._max_words = max(len(w.split()) for w in self._known)

    def mentioned(self, caption: str) -> set[str]:
        """COCO categories a caption names (longest phrases first, each word used once)."""
        words = [_singular(w, self._known) for w in re.findall(r"[a-z]+", caption.lower())]
        found, i = set(), 0
        while i < len(words):
            for n in range(min(self._max_words, len(words) - i), 0, -1):
                phrase = " ".join(words[i:i + n])
                if phrase in self.word_to_object:
                    found.add(self.word_to_object[phrase])
                    i += n
                    break
            else:
                i += 1
        return found

    def image_id(self, key: str | int) -> int:
        """A COCO image id from an id or an image file name (``COCO_val2014_000000391895.jpg``)."""
        if isinstance(key, int) and key in self.objects:
            return key
        name = Path(str(key)).name
        if name in self.file_ids:
            return self.file_ids[name]
        raise KeyError(f"image {key!r} is not in the instances file")

    def chair(self, captions: Sequence[str], images: Sequence[str | int]) -> dict:
        """CHAIR_i and CHAIR_s of ``captions[i]`` describing ``images[i]`` (ids or file names)."""
        mentions = hallucinated = bad_captions = 0
        for caption, key in zip(captions, images):
            truth = self.objects[self.image_id(key)]
            named = self.mentioned(caption)
            wrong = named - truth
            mentions += len(named)
            hallucinated += len(wrong)
            bad_captions += bool(wrong)
        n = len(captions)
        return {"CHAIR_i": hallucinated / mentions if mentions else 0.0, "CHAIR_s": bad_captions / n if n else 0.0,
                "chair_mentions": mentions, "chair_captions": n}
