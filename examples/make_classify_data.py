"""Regenerate the classification and tagging data in examples/data (deterministic; output is committed).

- ``intents-{train,eval}.jsonl``: commands a field crew types into a device, six intents,
  ``{"text": ..., "label": ...}``. The eval set holds phrasings (templates) never seen in training,
  so accuracy there measures more than memorised sentences.
- ``tags-{train,eval}.jsonl``: crew notes with part numbers and place names tagged word by word,
  ``{"tokens": [...], "tags": [...]}`` in the BIO scheme (``O``, ``B-PART``, ``I-PART``, ``B-LOC``,
  ``I-LOC``). The eval set uses part numbers and place names never seen in training.

Words are split as ``edgeft predict --text`` splits them (``edgeft.device.classify.split_words``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from edgeft.device.labelled import split_words

HERE = Path(__file__).parent / "data"
STATIONS = ["north ridge", "river bend", "old mill", "harbor gate", "pine hill", "salt flats", "east quarry"]
PARTS = ["pump", "valve", "sensor", "battery", "fan", "antenna", "filter", "panel", "controller"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "tomorrow", "next week", "this weekend"]
COUNTS = ["a", "one", "two", "three", "a spare", "a new"]

# Per intent: training templates, then the held-out ones (eval only).
INTENTS: dict[str, tuple[list[str], list[str]]] = {
    "status": (
        [
            "what is the status of the {part} at {station}?",
            "is the {part} at {station} working",
            "give me a status report for {station}",
            "how is the {part} at {station} doing",
            "show the latest readings from the {part} at {station}",
            "status {station} {part}",
        ],
        ["report the current state of the {part} at {station}", "any news from the {part} at {station}?"],
    ),
    "restart": (
        [
            "restart the {part} at {station}",
            "reboot the {part} at {station} now",
            "power cycle the {part} at {station}",
            "please reset the {part} at {station}",
            "the {part} at {station} needs a reboot",
            "restart {station} {part}",
        ],
        ["turn the {part} at {station} off and on again", "can you bounce the {part} at {station}"],
    ),
    "order_part": (
        [
            "order {count} {part} for {station}",
            "we need {count} {part} at {station}",
            "request a replacement {part} for {station}",
            "send {count} {part} to {station}",
            "add {count} {part} to the parts order for {station}",
            "buy {count} {part} for the {station} site",
        ],
        ["put {count} {part} on the next delivery to {station}", "{station} is out of spare {part}s, get more"],
    ),
    "report_fault": (
        [
            "the {part} at {station} is leaking",
            "the {part} at {station} stopped reporting",
            "the {part} at {station} makes a grinding noise",
            "{part} at {station} is broken",
            "the {part} at {station} keeps failing",
            "fault: {part} at {station} is stuck",
        ],
        ["something is wrong with the {part} at {station}", "the {part} at {station} was damaged by the storm"],
    ),
    "schedule_visit": (
        [
            "schedule a crew visit to {station} on {day}",
            "book maintenance at {station} for {day}",
            "send a technician to {station} {day}",
            "plan an inspection of the {part} at {station} on {day}",
            "can someone check {station} on {day}",
            "visit {station} {day}",
        ],
        ["put {station} on the route for {day}", "we should go out to {station} {day} to look at the {part}"],
    ),
    "weather": (
        [
            "what is the weather at {station}?",
            "will it rain at {station} {day}",
            "how windy is it at {station}",
            "forecast for {station} {day}",
            "is it too cold to work at {station} today",
            "weather {station}",
        ],
        ["what temperature is it at {station} right now", "should the crew at {station} expect a storm {day}?"],
    ),
}

# Tagging: part numbers and places. Training and eval draw from disjoint names (eval places use
# words never seen in training), so the tagger must learn the contexts and shapes, not the names.
PLACE_WORDS = (
    ["North", "South", "Old", "Upper", "Red", "Pine", "Iron", "Salt", "Long", "Maple", "Fox", "Birch"],
    ["Ridge", "Bend", "Mill", "Gate", "Hill", "Flats", "Quarry", "Point", "Valley", "Crossing", "Field"],
    ["Dover", "Ashby", "Kendal", "Thornton", "Rowley", "Hatfield"],
)
PLACE_WORDS_NEW = (
    ["West", "Cedar", "Stone", "Green", "Silver"],
    ["Creek", "Falls", "Bay", "Harbor", "Depot"],
    ["Marlow", "Brixham", "Alston"],
)
TAG_TEMPLATES = [
    "Replace {part} at {place} .",
    "Ship two {part} to {place} today .",
    "The crew at {place} installed {part} this morning .",
    "Is there a spare {part} in the {place} store ?",
    "{part} failed again at {place} , order a new one .",
    "Move the {part} from {place} to {place2} .",
    "Checked {part} and {part2} at {place} , both fine .",
    "No parts needed at {place} this week .",
    "Order {part} for the pump at {place} .",
    "{place} reports that {part} is leaking .",
    "Send {part} to {place} and {place2} before Friday .",
    "The {part} at {place} was swapped for a {part2} .",
    "Road to {place} is closed , deliver {part} via {place2} .",
    "Technician left {place} after fitting {part} .",
    "Please return the old {part} from {place} to the depot .",
    "Stock at {place} : three {part} , one {part2} .",
    "Visit {place} on Monday and bring {part} .",
    "Alarm from {place} , probably the {part} again .",
]


def place_name(rng: random.Random, words: tuple[list[str], list[str], list[str]]) -> str:
    first, second, single = words
    return rng.choice(single) if rng.random() < 0.25 else f"{rng.choice(first)} {rng.choice(second)}"


def part_number(rng: random.Random, letters: str) -> str:
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(1, 9999)}"


def intent_rows(rng: random.Random, held_out: bool, n_per_intent: int) -> list[dict]:
    rows = []
    for label, (seen, unseen) in INTENTS.items():
        templates = unseen if held_out else seen
        for i in range(n_per_intent):
            template = templates[i % len(templates)]
            part = rng.choice(PARTS)
            text = template.format(
                part=part, station=rng.choice(STATIONS), day=rng.choice(DAYS), count=rng.choice(COUNTS)
            )
            if rng.random() < 0.3:
                text = text.capitalize()
            rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def tagged(template: str, fills: dict[str, tuple[str, str]]) -> dict:
    """Words and BIO tags of ``template`` with ``fills`` = {slot: (text, entity type)}."""
    tokens, tags = [], []
    for piece in template.split(" "):
        if piece.startswith("{") and piece.endswith("}"):
            text, kind = fills[piece[1:-1]]
            words = split_words(text)
            tokens += [w for w, _, _ in words]
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        else:
            tokens.append(piece)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def tag_rows(rng: random.Random, held_out: bool, n: int) -> list[dict]:
    words = PLACE_WORDS_NEW if held_out else PLACE_WORDS
    letters = "QWXZDGJ" if held_out else "ABCEFHKLMNPRSTV"
    rows = []
    for i in range(n):
        template = TAG_TEMPLATES[i % len(TAG_TEMPLATES)]
        part, part2 = part_number(rng, letters), part_number(rng, letters)
        place, place2 = place_name(rng, words), place_name(rng, words)
        while place2 == place:
            place2 = place_name(rng, words)
        fills = {"part": (part, "PART"), "part2": (part2, "PART"), "place": (place, "LOC"), "place2": (place2, "LOC")}
        rows.append(tagged(template, fills))
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(16)
    HERE.mkdir(exist_ok=True)
    write(HERE / "intents-train.jsonl", intent_rows(rng, held_out=False, n_per_intent=48))
    write(HERE / "intents-eval.jsonl", intent_rows(rng, held_out=True, n_per_intent=16))
    write(HERE / "tags-train.jsonl", tag_rows(rng, held_out=False, n=270))
    write(HERE / "tags-eval.jsonl", tag_rows(rng, held_out=True, n=72))


if __name__ == "__main__":
    main()
