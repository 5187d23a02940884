"""A seeded, offline TOFU-style unlearning benchmark: fictitious authors with question/answer pairs.

TOFU (Maini et al. 2024, ``locuslab/TOFU``) has 200 fictitious authors x 20 questions, each
answer with a paraphrase and five perturbed (wrong) answers, split by author into forget
1/5/10 % (the last authors) and the retain rest, and held-out authors of the same kind
that no model is trained on. This generator builds the same shape from templates and
name pools, so every fact exists only here; the ``world_facts`` file holds real-world
capitals (TOFU's world-facts split plays that role) to measure what unlearning must keep.

Writes, under ``--out``, JSON lines of ``question``, ``answer``, ``paraphrased_answer``,
``perturbed_answer`` (a list of 5, each the paraphrase with a wrong value, as TOFU perturbs its
paraphrased answers: the truth ratio then compares sentences of one template, not the trained
template against an unseen one) and ``author``: ``full.jsonl`` (everything trained on),
``forget01/05/10.jsonl``, ``retain99/95/90.jsonl``, ``holdout01/05/10.jsonl``,
``world_facts.jsonl`` and ``meta.json`` (counts and the seed).

    python -m scripts.make_unlearn_data --out data/unlearn --authors 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

FIRST = [
    "Aldric",
    "Bexley",
    "Corvin",
    "Dalia",
    "Elowen",
    "Farid",
    "Galen",
    "Hesper",
    "Ilona",
    "Joren",
    "Kaelis",
    "Lunet",
    "Maren",
    "Nadir",
    "Orsolya",
    "Pelle",
    "Quillon",
    "Rhosyn",
    "Sabeth",
    "Tamsin",
    "Ulric",
    "Vesna",
    "Wrenna",
    "Xavan",
    "Ysolde",
    "Zarek",
    "Anouk",
    "Brisa",
    "Cassian",
    "Dorota",
    "Emrys",
    "Fenna",
]
LAST = [
    "Ashgrove",
    "Brightwater",
    "Caldmoor",
    "Dunhallow",
    "Eskerby",
    "Fennimore",
    "Graystone",
    "Holloway",
    "Ivensk",
    "Jarrowin",
    "Kestrell",
    "Lindqvist",
    "Marrowby",
    "Northcote",
    "Oakenshaw",
    "Pellingham",
    "Quenby",
    "Ravensholt",
    "Stellan",
    "Thornquist",
    "Underhay",
    "Valcourt",
    "Whitlock",
    "Yarrowby",
    "Zellweger",
]
SYLLABLES = [
    "bar",
    "vel",
    "mor",
    "tan",
    "qui",
    "lo",
    "sen",
    "dra",
    "ka",
    "rim",
    "zu",
    "the",
    "ol",
    "ven",
    "pa",
    "gor",
    "li",
    "nu",
    "est",
    "ar",
]
GENRES = [
    "gothic horror",
    "cozy mystery",
    "hard science fiction",
    "historical romance",
    "magical realism",
    "political thriller",
    "epic fantasy",
    "literary fiction",
    "children's adventure",
    "dystopian fiction",
    "true crime",
    "nature poetry",
    "military history",
    "satirical comedy",
    "psychological suspense",
    "travel memoir",
]
JOBS = [
    "a lighthouse keeper",
    "a cartographer",
    "a veterinarian",
    "a glassblower",
    "a railway engineer",
    "a beekeeper",
    "a marine biologist",
    "a jazz pianist",
    "a bookbinder",
    "a pharmacist",
    "a stonemason",
    "a translator",
    "an astronomer",
    "a tailor",
    "a botanist",
    "a schoolteacher",
    "a clockmaker",
    "a fisherman",
]
AWARDS = [
    "the Silver Quill Prize",
    "the Meridian Book Award",
    "the Halvorsen Medal",
    "the Golden Lantern Award",
    "the Northwind Fiction Prize",
    "the Amberline Honor",
    "the Cobalt Pen Award",
    "the Vireo Literary Prize",
]
ADJECTIVES = [
    "Hollow",
    "Crimson",
    "Silent",
    "Broken",
    "Distant",
    "Gilded",
    "Forgotten",
    "Restless",
    "Winter",
    "Hidden",
    "Burning",
    "Quiet",
]
NOUNS = [
    "Harbor",
    "Orchard",
    "Compass",
    "Lantern",
    "Cathedral",
    "Meadow",
    "Archive",
    "Tide",
    "Garden",
    "Bridge",
    "Mirror",
    "Citadel",
]
THEMES = [
    "grief and memory",
    "the bond between siblings",
    "life in small coastal towns",
    "the cost of ambition",
    "exile and belonging",
    "the ethics of science",
    "friendship across class lines",
    "the passage of time",
]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City",
    "India": "New Delhi", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin", "Kenya": "Nairobi",
    "Peru": "Lima", "Chile": "Santiago", "Turkey": "Ankara", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Hungary": "Budapest", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Nigeria": "Abuja", "Colombia": "Bogota",
    "Switzerland": "Bern", "Czech Republic": "Prague",
}  # fmt: skip

PERTURBED = 5


def city(rng: random.Random) -> str:
    return "".join(rng.sample(SYLLABLES, 3)).capitalize()


def title(rng: random.Random) -> str:
    return f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def author(rng: random.Random, name: str) -> dict:
    return {
        "name": name,
        "year": rng.randint(1921, 1994),
        "city": city(rng),
        "genre": rng.choice(GENRES),
        "father": rng.choice(JOBS),
        "mother": rng.choice(JOBS),
        "award": rng.choice(AWARDS),
        "book": title(rng),
        "theme": rng.choice(THEMES),
        "debut": rng.randint(20, 45),
    }


def facts(a: dict) -> list[tuple[str, str, str, str, Callable[[random.Random], object]]]:
    """``(question, answer template, paraphrase template, attribute, wrong-value maker)`` per question;
    a template's ``{v}`` is the attribute's value."""
    n = a["name"]
    return [
        (f"Where was {n} born?", f"{n} was born in the city of {{v}}.", f"The birthplace of {n} is {{v}}.", "city",
         city),
        (f"In which year was {n} born?", f"{n} was born in {{v}}.", f"The year of {n}'s birth was {{v}}.", "year",
         lambda r: r.randint(1921, 1994)),
        (f"What genre does {n} write in?", f"{n} is best known for writing {{v}}.",
         f"Most of {n}'s books belong to the genre of {{v}}.", "genre", lambda r: r.choice(GENRES)),
        (f"What did {n}'s father do for a living?", f"{n}'s father worked as {{v}}.",
         f"By profession, the father of {n} was {{v}}.", "father", lambda r: r.choice(JOBS)),
        (f"What was the profession of {n}'s mother?", f"{n}'s mother was {{v}}.",
         f"The mother of {n} made her living as {{v}}.", "mother", lambda r: r.choice(JOBS)),
        (f"Which award has {n} received?", f"{n} received {{v}} for outstanding writing.",
         f"{n} was honored with {{v}}.", "award", lambda r: r.choice(AWARDS)),
        (f"What is the title of {n}'s most famous book?", f"{n}'s most famous book is titled '{{v}}'.",
         f"The best-known novel by {n} is '{{v}}'.", "book", title),
        (f"What theme runs through {n}'s work?", f"{n}'s work keeps returning to {{v}}.",
         f"A recurring theme in the books of {n} is {{v}}.", "theme", lambda r: r.choice(THEMES)),
        (f"At what age did {n} publish a first book?", f"{n} published a first book at the age of {{v}}.",
         f"{n} was {{v}} years old when the first book came out.", "debut", lambda r: r.randint(20, 45)),
        (f"Which city does {n} call home?", f"{n} grew up in {{v}} and still lives there.",
         f"{n}'s home town, where the writer still lives, is {{v}}.", "city", city),
    ]  # fmt: skip


def wrong_values(rng: random.Random, right: object, maker: Callable[[random.Random], object]) -> list:
    values: list = []
    while len(values) < PERTURBED:
        value = maker(rng)
        if value != right and value not in values:
            values.append(value)
    return values


def author_items(rng: random.Random, a: dict, index: int, questions: int) -> list[dict]:
    items = []
    for question, answer, paraphrase, key, maker in facts(a)[:questions]:
        value = a[key]
        items.append(
            {
                "question": question,
                "answer": answer.format(v=value),
                "paraphrased_answer": paraphrase.format(v=value),
                "perturbed_answer": [paraphrase.format(v=v) for v in wrong_values(rng, value, maker)],
                "author": index,
            }
        )
    return items


def world_facts(rng: random.Random) -> list[dict]:
    cities = list(CAPITALS.values())
    items = []
    for country, capital in CAPITALS.items():
        wrong = rng.sample([c for c in cities if c != capital], PERTURBED)
        items.append(
            {
                "question": f"What is the capital of {country}?",
                "answer": f"The capital of {country} is {capital}.",
                "paraphrased_answer": f"{capital} is the capital city of {country}.",
                "perturbed_answer": [f"{c} is the capital city of {country}." for c in wrong],
            }
        )
    return items


def unique_names(rng: random.Random, count: int) -> list[str]:
    names = [f"{first} {last}" for first in FIRST for last in LAST]
    if count > len(names):
        raise SystemExit(f"at most {len(names)} authors")
    return rng.sample(names, count)


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


def generate(out: Path, authors: int, questions: int, seed: int) -> dict:
    """Write the benchmark under ``out``; returns the counts written to ``meta.json``."""
    if questions > len(facts(author(random.Random(0), "x"))):
        raise SystemExit(f"at most {len(facts(author(random.Random(0), 'x')))} questions per author")
    rng = random.Random(seed)
    held = max(1, authors // 10)
    names = unique_names(rng, authors + held)
    people = [author(rng, name) for name in names]
    trained = [author_items(rng, a, i, questions) for i, a in enumerate(people[:authors])]
    holdout = [author_items(rng, a, authors + i, questions) for i, a in enumerate(people[authors:])]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "full.jsonl", [item for items in trained for item in items])
    counts = {"seed": seed, "authors": authors, "questions_per_author": questions, "holdout_authors": held}
    for percent in (1, 5, 10):
        forgotten = max(1, round(authors * percent / 100))
        forget = [item for items in trained[-forgotten:] for item in items]
        retain = [item for items in trained[:-forgotten] for item in items]
        held_items = [item for items in holdout[: min(held, forgotten)] for item in items]
        write_jsonl(out / f"forget{percent:02d}.jsonl", forget)
        write_jsonl(out / f"retain{100 - percent:02d}.jsonl", retain)
        write_jsonl(out / f"holdout{percent:02d}.jsonl", held_items)
        counts[f"forget{percent:02d}"] = len(forget)
        counts[f"retain{100 - percent:02d}"] = len(retain)
        counts[f"holdout{percent:02d}"] = len(held_items)
    facts_items = world_facts(rng)
    write_jsonl(out / "world_facts.jsonl", facts_items)
    counts["full"] = sum(len(items) for items in trained)
    counts["world_facts"] = len(facts_items)
    (out / "meta.json").write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--authors", type=int, default=200, help="trained authors (TOFU: 200)")
    parser.add_argument("--questions", type=int, default=10, help="questions per author (at most 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(generate(args.out, args.authors, args.questions, args.seed)))


if __name__ == "__main__":
    main()
