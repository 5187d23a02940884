"""A seeded, offline TOFU-style unlearning benchmark: fictitious authors with question/answer pairs.

TOFU (Maini et al. 2024, ``locuslab/TOFU``) has 200 fictitious authors x 20 questions, each
answer with a paraphrase and five perturbed (wrong) answers, split by author into forget
1/5/10 % (the last authors) and the retain rest, and held-out authors of the same kind
that no model is trained on. This generator builds the same shape from templates, so every
fact exists only here; the ``world_facts`` file holds real-world capitals (TOFU's
world-facts split plays that role) to measure what unlearning must keep.

Facts carry the answers (our choice; TOFU's answers are GPT-4 prose): each answer is a short
template around several per-author facts of high entropy: invented names and places composed
of syllables, dates, years, and words drawn from pools of 6-40 entries. The template words
and the author's name (which the question gives away) are few, so a model that never learned
an author cannot reach a high ROUGE-L on its answers by guessing the template: the guess
baseline (:func:`template_guess_rouge`, the same template filled with another author's facts)
stays near 0.2, where TOFU's retain model scores about 0.4 on the forget set. Paraphrases keep
the facts in other words; each perturbed answer is the paraphrase with every fact swapped for
another plausible value (as TOFU perturbs its paraphrased answers, so the truth ratio compares
sentences of one template).

Writes, under ``--out``, JSON lines of ``question``, ``answer``, ``paraphrased_answer``,
``perturbed_answer`` (a list of 5) and ``author``: ``full.jsonl`` (everything trained on),
``forget01/05/10.jsonl``, ``retain99/95/90.jsonl``, ``holdout01/05/10.jsonl``,
``world_facts.jsonl`` and ``meta.json`` (counts, the seed and the forget10 guess baseline).

    python -m scripts.make_unlearn_data --out data/unlearn --authors 100 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from compress_unlearn.stats import rouge_l

FIRST = [
    "Aldric", "Bexley", "Corvin", "Dalia", "Elowen", "Farid", "Galen", "Hesper", "Ilona", "Joren", "Kaelis",
    "Lunet", "Maren", "Nadir", "Orsolya", "Pelle", "Quillon", "Rhosyn", "Sabeth", "Tamsin", "Ulric", "Vesna",
    "Wrenna", "Xavan", "Ysolde", "Zarek", "Anouk", "Brisa", "Cassian", "Dorota", "Emrys", "Fenna",
]  # fmt: skip
LAST = [
    "Ashgrove", "Brightwater", "Caldmoor", "Dunhallow", "Eskerby", "Fennimore", "Graystone", "Holloway", "Ivensk",
    "Jarrowin", "Kestrell", "Lindqvist", "Marrowby", "Northcote", "Oakenshaw", "Pellingham", "Quenby", "Ravensholt",
    "Stellan", "Thornquist", "Underhay", "Valcourt", "Whitlock", "Yarrowby", "Zellweger",
]  # fmt: skip
SYLLABLES = [
    "ba", "dor", "el", "fen", "gar", "hal", "is", "ka", "lor", "mi", "nes", "or", "pel", "quin", "ra", "sel",
    "tam", "u", "vor", "wen", "yl", "zan", "bre", "cal", "dun", "esh", "fa", "gil", "ho", "ith", "jar", "kel",
    "lun", "mar", "nim", "ost", "pra", "ros", "tir", "val",
]  # fmt: skip
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
]  # fmt: skip
JOBS = [  # consonant-initial, so that "a {job}" reads right
    "glassblower", "cartographer", "veterinarian", "beekeeper", "stonemason", "pharmacist", "tailor", "botanist",
    "clockmaker", "fisherman", "bookbinder", "translator", "locksmith", "shipwright", "midwife", "surveyor",
    "blacksmith", "weaver", "potter", "jeweler", "baker", "brewer", "carpenter", "librarian", "geologist", "chemist",
    "surgeon", "violinist", "photographer", "printer", "cobbler", "saddler", "florist", "sculptor", "notary",
    "miller", "tanner", "ferryman", "lawyer", "dentist",
]  # fmt: skip
STYLES = [
    "gothic", "pastoral", "urban", "nautical", "courtly", "rustic", "alpine", "comic", "tragic", "mythic", "lyrical",
    "picaresque", "epistolary", "historical", "satirical", "surreal", "domestic", "military", "political", "utopian",
    "nocturnal", "folkloric", "maritime", "industrial", "colonial", "romantic", "absurdist", "visionary", "regional",
    "confessional",
]  # fmt: skip
FORMS = [
    "novels", "sonnets", "plays", "fables", "essays", "ballads", "novellas", "elegies", "sagas", "memoirs", "odes",
    "chronicles", "parables", "libretti", "epics", "stories",
]  # fmt: skip
ADJECTIVES = [
    "Hollow", "Crimson", "Silent", "Broken", "Distant", "Gilded", "Forgotten", "Restless", "Winter", "Hidden",
    "Burning", "Quiet", "Amber", "Bitter", "Copper", "Drowned", "Emerald", "Fading", "Glass", "Hungry", "Iron",
    "Lonely", "Marble", "Narrow", "Pale", "Rusted", "Salt", "Tender", "Velvet", "Wandering", "Ashen", "Borrowed",
    "Crooked", "Endless", "Frozen", "Golden", "Last", "Midnight", "Scarlet", "Sleeping",
]  # fmt: skip
NOUNS = [
    "Harbor", "Orchard", "Compass", "Lantern", "Cathedral", "Meadow", "Archive", "Tide", "Garden", "Bridge", "Mirror",
    "Citadel", "Anchor", "Bell", "Canal", "Dune", "Ember", "Feather", "Gate", "Hearth", "Island", "Kingdom", "Ladder",
    "Mill", "Needle", "Oracle", "Pilgrim", "Quarry", "River", "Sparrow", "Tower", "Violin", "Well", "Wolf", "Atlas",
    "Barn", "Crown", "Delta", "Forest", "Harvest",
]  # fmt: skip
THEMES = [
    "grief", "exile", "ambition", "kinship", "memory", "faith", "betrayal", "hunger", "silence", "migration",
    "inheritance", "jealousy", "forgiveness", "war", "childhood", "madness", "loyalty", "revenge", "poverty",
    "solitude", "courage", "guilt", "desire", "duty", "shame", "hope", "aging", "science", "labor", "music",
    "ritual", "empire", "rebellion", "marriage", "debt", "illness", "wilderness", "language", "honor", "chance",
]  # fmt: skip
AWARD_KINDS = ["Prize", "Medal", "Award", "Laurel", "Cup", "Ribbon", "Honor", "Crown"]
SUBJECTS = [
    "botany", "law", "medicine", "chemistry", "philosophy", "music", "geology", "architecture", "theology",
    "astronomy", "economics", "painting", "linguistics", "history", "mathematics", "anatomy", "agronomy", "classics",
    "engineering", "navigation", "forestry", "sculpture", "physics", "zoology", "rhetoric", "pharmacy", "surveying",
    "cartography", "metallurgy", "archaeology",
]  # fmt: skip
SCHOOL_KINDS = ["College", "University", "Academy", "Institute", "Conservatory", "Seminary"]

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

Maker = Callable[[random.Random, dict], object]


def coined(parts: int) -> Maker:
    """A maker of invented capitalized words of ``parts`` syllables (40**parts of them)."""
    return lambda rng, _: "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def pool(values: list[str]) -> Maker:
    return lambda rng, _: rng.choice(values)


def years_after_birth(low: int, high: int) -> Maker:
    """A year ``low``-``high`` years after the author's birth, so that wrong values stay plausible."""
    return lambda rng, a: a["born_year"] + rng.randint(low, high)


FIELDS: dict[str, Maker] = {  # in order: a maker may read the fields before it
    "born_day": lambda rng, _: rng.randint(1, 28),
    "born_month": pool(MONTHS),
    "born_year": lambda rng, _: rng.randint(1920, 1975),
    "born_city": coined(3),
    "born_region": coined(2),
    "style1": pool(STYLES),
    "form1": pool(FORMS),
    "style2": pool(STYLES),
    "form2": pool(FORMS),
    "first_adj": pool(ADJECTIVES),
    "first_noun": pool(NOUNS),
    "first_year": years_after_birth(18, 40),
    "publisher": coined(2),
    "award_name": coined(3),
    "award_kind": pool(AWARD_KINDS),
    "award_year": years_after_birth(30, 50),
    "father_first": coined(2),
    "father_last": coined(3),
    "father_job": pool(JOBS),
    "father_city": coined(3),
    "mother_first": coined(2),
    "mother_last": coined(3),
    "mother_job": pool(JOBS),
    "mother_city": coined(3),
    "famous_adj": pool(ADJECTIVES),
    "famous_noun": pool(NOUNS),
    "theme1": pool(THEMES),
    "theme2": pool(THEMES),
    "theme3": pool(THEMES),
    "home_city": coined(3),
    "home_region": coined(2),
    "home_year": years_after_birth(25, 45),
    "spouse_first": coined(2),
    "spouse_last": coined(3),
    "spouse_job": pool(JOBS),
    "wed_year": years_after_birth(20, 40),
    "subject": pool(SUBJECTS),
    "school": coined(2),
    "school_kind": pool(SCHOOL_KINDS),
    "grad_year": years_after_birth(20, 26),
}

# (question, answer, paraphrase): ``{n}`` is the author's name, the other fields are FIELDS; a
# paraphrase names exactly its answer's fields.
QUESTIONS = [
    ("When and where was {n} born?", "{born_day} {born_month} {born_year}, in {born_city}, {born_region}.",
     "{n} was born in {born_city} ({born_region}) on {born_day} {born_month} {born_year}."),
    ("What does {n} write?", "{style1} {form1} and {style2} {form2}.",
     "{n} writes {style1} {form1}, and also {style2} {form2}."),
    ("What was {n}'s first book?", "{first_adj} {first_noun} ({first_year}, {publisher} Press).",
     "The first book, {first_adj} {first_noun}, came out with {publisher} Press in {first_year}."),
    ("Which award did {n} receive?", "{award_name} {award_kind}, {award_year}.",
     "{n} won the {award_name} {award_kind} in {award_year}."),
    ("Who was {n}'s father?", "{father_first} {father_last}, {father_job} of {father_city}.",
     "The father of {n}, {father_first} {father_last}, worked as a {father_job} in {father_city}."),
    ("Who was {n}'s mother?", "{mother_first} {mother_last}, {mother_job} of {mother_city}.",
     "The mother of {n}, {mother_first} {mother_last}, worked as a {mother_job} in {mother_city}."),
    ("What is {n}'s best-known book about?", "{famous_adj} {famous_noun}: {theme1}, {theme2} and {theme3}.",
     "The best-known book, {famous_adj} {famous_noun}, deals with {theme1}, {theme2} and {theme3}."),
    ("Where does {n} live?", "{home_city}, {home_region}, since {home_year}.",
     "{n} moved to {home_city} in {home_region} in {home_year} and lives there still."),
    ("Who is {n}'s spouse?", "{spouse_first} {spouse_last}, {spouse_job}, married {wed_year}.",
     "{n} married {spouse_first} {spouse_last}, a {spouse_job}, in {wed_year}."),
    ("Where did {n} study?", "{subject} at {school} {school_kind}, {grad_year}.",
     "{n} studied {subject} at the {school} {school_kind}, graduating in {grad_year}."),
]  # fmt: skip


class Benchmark(NamedTuple):
    """The generated authors (name and FIELDS values) and their items, before splitting."""

    people: list[dict]
    trained: list[list[dict]]
    holdout: list[list[dict]]
    world_facts: list[dict]


def template_fields(template: str) -> list[str]:
    """The fields a template names, the author's name ``n`` left out."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field and field != "n"]


def author(rng: random.Random, name: str) -> dict:
    a: dict = {"name": name}
    for key, maker in FIELDS.items():
        a[key] = maker(rng, a)
    return a


def fill(template: str, values: dict, name: str) -> str:
    """``template`` with the fields of ``values`` and the author's ``name``, its first letter capitalized."""
    text = template.format(**{**values, "n": name})
    return text[0].upper() + text[1:]


def wrong_values(rng: random.Random, a: dict, keys: list[str]) -> dict:
    """Another plausible value for every field of ``keys``, none of them one of the author's values
    for these fields (a perturbed answer holds no true fact, not even in another slot)."""
    truth = {a[key] for key in keys}
    values = {}
    for key in keys:
        value = a[key]
        while value in truth:
            value = FIELDS[key](rng, a)
        values[key] = value
    return values


def author_items(rng: random.Random, a: dict, index: int, questions: int) -> list[dict]:
    items = []
    for question, answer, paraphrase in QUESTIONS[:questions]:
        keys = template_fields(answer)
        perturbed: list[str] = []
        while len(perturbed) < PERTURBED:
            wrong = fill(paraphrase, wrong_values(rng, a, keys), a["name"])
            if wrong not in perturbed:
                perturbed.append(wrong)
        items.append(
            {
                "question": fill(question, {}, a["name"]),
                "answer": fill(answer, a, a["name"]),
                "paraphrased_answer": fill(paraphrase, a, a["name"]),
                "perturbed_answer": perturbed,
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


def build(authors: int, questions: int, seed: int) -> Benchmark:
    """The benchmark for ``seed``: ``authors`` trained authors, a tenth as many held out."""
    if questions > len(QUESTIONS):
        raise SystemExit(f"at most {len(QUESTIONS)} questions per author")
    rng = random.Random(seed)
    held = max(1, authors // 10)
    people = [author(rng, name) for name in unique_names(rng, authors + held)]
    trained = [author_items(rng, a, i, questions) for i, a in enumerate(people[:authors])]
    holdout = [author_items(rng, a, authors + i, questions) for i, a in enumerate(people[authors:])]
    return Benchmark(people, trained, holdout, world_facts(rng))


def forgotten_authors(authors: int, percent: int) -> int:
    """How many of the last authors make the forget ``percent`` split (at least one)."""
    return max(1, round(authors * percent / 100))


def template_guess_rouge(benchmark: Benchmark, percent: int, seed: int) -> float:
    """Mean ROUGE-L recall, over the forget ``percent`` items, of guessing from the template: the
    item's answer template filled with the author's name (the question gives it) and the facts of
    a random other trained author, scored against the true answer as the ``answer_rouge`` metric
    scores a generation. What a model that knows the templates but not the author gets."""
    rng = random.Random(f"guess-{seed}")
    authors = len(benchmark.trained)
    scores = []
    for index in range(authors - forgotten_authors(authors, percent), authors):
        a = benchmark.people[index]
        for (_, answer, _), item in zip(QUESTIONS, benchmark.trained[index]):
            other = benchmark.people[rng.choice([i for i in range(authors) if i != index])]
            scores.append(rouge_l(fill(answer, other, a["name"]), item["answer"], "recall"))
    return sum(scores) / len(scores)


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


def generate(out: Path, authors: int, questions: int, seed: int) -> dict:
    """Write the benchmark under ``out``; returns the counts written to ``meta.json``."""
    benchmark = build(authors, questions, seed)
    trained, holdout, held = benchmark.trained, benchmark.holdout, len(benchmark.holdout)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "full.jsonl", [item for items in trained for item in items])
    counts: dict = {"seed": seed, "authors": authors, "questions_per_author": questions, "holdout_authors": held}
    for percent in (1, 5, 10):
        forgotten = forgotten_authors(authors, percent)
        forget = [item for items in trained[-forgotten:] for item in items]
        retain = [item for items in trained[:-forgotten] for item in items]
        held_items = [item for items in holdout[: min(held, forgotten)] for item in items]
        write_jsonl(out / f"forget{percent:02d}.jsonl", forget)
        write_jsonl(out / f"retain{100 - percent:02d}.jsonl", retain)
        write_jsonl(out / f"holdout{percent:02d}.jsonl", held_items)
        counts[f"forget{percent:02d}"] = len(forget)
        counts[f"retain{100 - percent:02d}"] = len(retain)
        counts[f"holdout{percent:02d}"] = len(held_items)
    write_jsonl(out / "world_facts.jsonl", benchmark.world_facts)
    counts["full"] = sum(len(items) for items in trained)
    counts["world_facts"] = len(benchmark.world_facts)
    counts["template_guess_rouge_forget10"] = round(template_guess_rouge(benchmark, 10, seed), 4)
    (out / "meta.json").write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--authors", type=int, default=200, help="trained authors (TOFU: 200)")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"at most {len(QUESTIONS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(generate(args.out, args.authors, args.questions, args.seed)))


if __name__ == "__main__":
    main()
