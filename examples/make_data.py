"""Regenerate the small bundled data set in examples/data (deterministic; output is committed).

The data are short maintenance notes from imaginary field stations, written from templates so
that a tiny model can learn their patterns in a minute on two cores.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent / "data"
STATIONS = [
    "north ridge",
    "river bend",
    "old mill",
    "harbor gate",
    "pine hill",
    "salt flats",
    "east quarry",
    "lake shore",
]
PARTS = ["pump", "valve", "sensor", "battery", "fan", "antenna", "filter", "panel"]
STATES = {
    "ok": "no action needed",
    "worn": "replace at next visit",
    "failed": "replace now",
    "noisy": "clean and recheck",
}
WEATHER = ["clear", "windy", "rainy", "foggy", "cold", "hot"]


def note(rng: random.Random) -> tuple[str, str, str]:
    station, part, state = rng.choice(STATIONS), rng.choice(PARTS), rng.choice(list(STATES))
    temp, weather = rng.randint(-10, 38), rng.choice(WEATHER)
    prompt = f"Station {station}: {part} is {state}. What should the crew do?"
    answer = f"The {part} at {station} is {state}: {STATES[state]}."
    text = f"Log {rng.randint(100, 999)}. Weather {weather}, {temp} degrees. {answer}"
    return prompt, answer, text


def main() -> None:
    rng = random.Random(7)
    HERE.mkdir(exist_ok=True)
    rows = [note(rng) for _ in range(400)]
    corpus = [t for _, _, t in rows] + [p for p, _, _ in rows]
    (HERE / "corpus.txt").write_text("\n".join(corpus) + "\n")
    train, evaluation = rows[:320], rows[320:]
    with open(HERE / "train.jsonl", "w") as f:
        for i, (prompt, answer, text) in enumerate(train):
            if i % 3 == 0:
                rec = {"text": text}
            elif i % 3 == 1:
                rec = {"prompt": prompt, "completion": " " + answer}
            else:
                rec = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(rec) + "\n")
    with open(HERE / "eval.jsonl", "w") as f:
        for prompt, answer, _ in evaluation:
            f.write(json.dumps({"prompt": prompt, "completion": " " + answer}) + "\n")
    write_lm_eval_docs(evaluation[:24])


def write_lm_eval_docs(rows: list[tuple[str, str, str]]) -> None:
    """examples/lm_eval/stations.jsonl: the documents of the two lm-evaluation-harness tasks there
    (a multiple-choice pick of the crew's action, and the generated answer)."""
    actions = list(STATES.values())
    out = Path(__file__).parent / "lm_eval" / "stations.jsonl"
    with open(out, "w") as f:
        for prompt, answer, _ in rows:
            head, action = answer[:-1].split(": ")
            choices = [f"{head}: {a}." for a in actions]
            doc = {"question": prompt, "choices": choices, "label": actions.index(action), "answer": answer}
            f.write(json.dumps(doc) + "\n")


if __name__ == "__main__":
    main()
