"""Read the attributes a caption states and check them against a scene's ground truth.

A caption is scanned left to right into object phrases: ``[count] [size] [colour] noun
[at the <position>]``. A noun is a shape ("circle", "crosses") or a generic one ("shape",
"object"). Modifiers bind to the next noun, a position to the phrase before it (or, when no
phrase is waiting, to the next one: "at the top left a circle"), a colour before "background" to
the background. Each stated attribute becomes a *mention*:

- ``("shape", s)``; ``("color"|"size"|"position", s, value)`` bound to shape ``s`` (None for a
  generic noun: true if any object has the value); ``("count", s, n)`` for number words (for a
  generic noun: the total); ``("background", None, colour)``.

Precision = true mentions / mentions; recall = ground-truth facts (each object's shape, and its
colour, size and position bound to its shape, plus the background) that some true mention states,
over all facts. Hallucination = 1 - precision.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from shapes_world.world import BACKGROUNDS, COLORS, NUMBER_WORDS, PLURALS, POSITION_SYNONYMS, SIZES, Scene
from vlrm.metrics import words

_SINGULAR = {s: s for s in PLURALS} | {p: s for s, p in PLURALS.items()}
_GENERIC = {"shape", "shapes", "object", "objects", "thing", "things"}
_COLORS = set(COLORS) | set(BACKGROUNDS)
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"single": 1}
# Longest synonyms first so "top left" wins over "top" and "left".
_POSITIONS = sorted(((tuple(syn.split()), pos) for pos, syns in POSITION_SYNONYMS.items() for syn in syns),
                    key=lambda x: -len(x[0]))

Mention = tuple  # (kind, shape | None, value)


@dataclass
class _Phrase:
    shape: str | None
    count: int | None = None
    size: str | None = None
    color: str | None = None
    position: str | None = None


def parse_caption(caption: str, unbound: bool = False) -> list[Mention]:
    """The caption's mentions (module docstring). Modifiers with no noun after them ("a large
    blue at the top") state nothing by default; with ``unbound=True`` they, and a position no
    phrase takes, become a phrase of a generic noun ("a large blue object at the top"), so that
    a noun left out does not hide what the words around it claim."""
    toks = words(caption)
    phrases: list[_Phrase] = []
    mentions: list[Mention] = []
    pending: dict = {}
    pending_position: str | None = None
    i = 0
    while i < len(toks):
        w = toks[i]
        pos = _match_position(toks, i)
        if pos is not None:
            value, n = pos
            last = phrases[-1] if phrases else None
            if last is not None and last.position is None and not pending:
                last.position = value
            elif unbound and pending:
                phrases.append(_Phrase(shape=None, position=value, **pending))
                pending = {}
            else:
                if unbound and pending_position is not None:
                    phrases.append(_Phrase(shape=None, position=pending_position))
                pending_position = value
            i += n
            continue
        if w in _NUMBERS:
            pending["count"] = _NUMBERS[w]
        elif w in SIZES:
            pending["size"] = w
        elif w in _COLORS:
            if i + 1 < len(toks) and toks[i + 1] in ("background", "picture"):
                mentions.append(("background", None, w))
            elif i > 0 and toks[i - 1] == "on" and (i + 1 == len(toks) or toks[i + 1] in (":", "with")):
                mentions.append(("background", None, w))
            else:
                pending["color"] = w
        elif w in _SINGULAR or w in _GENERIC:
            ph = _Phrase(shape=_SINGULAR.get(w), **pending)
            if pending_position is not None:
                ph.position, pending_position = pending_position, None
            phrases.append(ph)
            pending = {}
        i += 1
    if unbound and (pending or pending_position is not None):
        phrases.append(_Phrase(shape=None, position=pending_position, **pending))
    for ph in phrases:
        if ph.shape is not None:
            mentions.append(("shape", ph.shape, ph.shape))
        for kind in ("color", "size", "position", "count"):
            value = getattr(ph, kind)
            if value is not None:
                mentions.append((kind, ph.shape, value))
    return mentions


def _match_position(toks: list[str], i: int) -> tuple[str, int] | None:
    for syn, pos in _POSITIONS:
        if tuple(toks[i:i + len(syn)]) == syn:
            # "left"/"right"/"top"... alone count only after "at/in the", so that a stray word
            # is not read as a position.
            if len(syn) == 1 and not (i >= 2 and toks[i - 1] == "the" and toks[i - 2] in ("at", "in", "on")):
                if not (i >= 1 and toks[i - 1] in ("the",)):
                    continue
            return pos, len(syn)
    return None


def scene_facts(scene: Scene) -> set[Mention]:
    facts: set[Mention] = {("background", None, scene.background)}
    for o in scene.objects:
        facts |= {("shape", o.shape, o.shape), ("color", o.shape, o.color), ("size", o.shape, o.size),
                  ("position", o.shape, o.position)}
    return facts


def is_true(m: Mention, scene: Scene) -> bool:
    kind, shape, value = m
    objs = [o for o in scene.objects if shape is None or o.shape == shape]
    if kind == "background":
        return scene.background == value
    if kind == "shape":
        return bool(objs)
    if kind == "count":
        return len(objs) == value
    return any(getattr(o, kind) == value for o in objs)


def _covers(m: Mention, fact: Mention) -> bool:
    return m[0] == fact[0] and m[2] == fact[2] and (m[1] is None or m[1] == fact[1])


def attribute_scores(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Pooled attribute precision and recall, with per-kind precision; and the precision with
    modifiers that no noun takes counted too (``parse_caption(unbound=True)``), with how many
    more mentions per caption that makes."""
    true_by_kind, total_by_kind = Counter(), Counter()
    covered = facts_total = 0
    for cap, scene in zip(captions, scenes, strict=True):
        mentions = parse_caption(cap)
        ok = [m for m in mentions if is_true(m, scene)]
        for m in mentions:
            total_by_kind[m[0]] += 1
        for m in ok:
            true_by_kind[m[0]] += 1
        facts = scene_facts(scene)
        facts_total += len(facts)
        covered += sum(any(_covers(m, f) for m in ok) for f in facts)
    mentions_total = sum(total_by_kind.values())
    out = {
        "attribute_precision": sum(true_by_kind.values()) / mentions_total if mentions_total else 1.0,
        "attribute_recall": covered / facts_total if facts_total else 0.0,
        "mentions_per_caption": mentions_total / max(len(captions), 1),
    }
    for kind in ("shape", "color", "size", "position", "count", "background"):
        if total_by_kind[kind]:
            out[f"precision_{kind}"] = true_by_kind[kind] / total_by_kind[kind]
    strict = [(parse_caption(cap, unbound=True), scene) for cap, scene in zip(captions, scenes)]
    strict_total = sum(len(ms) for ms, _ in strict)
    out["attribute_precision_unbound"] = (sum(is_true(m, sc) for ms, sc in strict for m in ms) / strict_total
                                          if strict_total else 1.0)
    out["unbound_mentions_per_caption"] = (strict_total - mentions_total) / max(len(captions), 1)
    return out
