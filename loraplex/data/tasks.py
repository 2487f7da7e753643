"""Built-in synthetic tasks: short, rule-based answers a small LLM can learn quickly with LoRA.

Every task draws examples from a `random.Random`, so a split is fully determined by (task, split,
seed). Train and test are disjoint by construction: each prompt belongs to exactly one side,
decided by a hash of its text (1 prompt in 8 is held out), so no seed, size or split combination can
leak a test prompt into training. Within a split, prompts are unique.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

SPLITS = ("train", "test")
HELD_OUT_ONE_IN = 8  # 1/8 of all prompts of a task belong to the test side


@dataclass(frozen=True)
class Example:
    """One supervised example: the instruction text and the exact expected answer."""

    prompt: str  # user-facing instruction text (no chat template applied)
    completion: str  # the exact expected answer
    messages: list[dict] | None = None  # for chat-format user data; None for tasks


@dataclass(frozen=True)
class Task:
    """A named generator of examples."""

    name: str
    description: str
    generate: Callable[[random.Random], Example]


# --- word pools ---
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
MONTH_ABBR = [m[:3] for m in MONTHS]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

FIRST_NAMES = ["Maria", "James", "Aisha", "Tom", "Elena", "Kofi", "Yuki", "Lucas", "Priya", "Omar",
               "Sofia", "Daniel", "Mei", "Pablo", "Hannah", "Ivan", "Grace", "Mateo", "Leila", "Noah",
               "Chloe", "Arjun", "Fatima", "Erik", "Zoe", "Samuel", "Nina", "Hugo", "Amara", "Felix"]
LAST_NAMES = ["Lopez", "Smith", "Khan", "Novak", "Rossi", "Mensah", "Tanaka", "Silva", "Patel", "Haddad",
              "Garcia", "Cohen", "Chen", "Ruiz", "Becker", "Petrov", "Kim", "Fischer", "Nasser", "Berg",
              "Martin", "Singh", "Okafor", "Larsen", "Moreau", "Walsh", "Ivanova", "Dubois", "Adeyemi",
              "Costa"]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Lyon", "Denver", "Krakow", "Seville", "Hamburg",
          "Melbourne", "Cairo", "Dublin", "Austin", "Porto", "Bergen", "Leeds", "Quito", "Hanoi",
          "Tucson", "Geneva", "Accra", "Turin", "Glasgow", "Seoul", "Perth", "Boston", "Lima", "Munich",
          "New York", "Buenos Aires", "Cape Town", "San Diego", "Mexico City", "Kuala Lumpur"]
WORDS = ["apple", "river", "candle", "mountain", "pencil", "garden", "window", "tiger", "basket",
         "cloud", "hammer", "violin", "orange", "bridge", "castle", "dolphin", "engine", "feather",
         "guitar", "harbor", "island", "jacket", "kettle", "lemon", "mirror", "needle", "ocean",
         "pepper", "quilt", "rabbit", "saddle", "tunnel", "umbrella", "valley", "wagon", "yogurt",
         "zebra", "anchor", "button", "carpet", "desert", "eagle", "forest", "ginger", "helmet",
         "iron", "jungle", "kitten", "ladder", "marble", "nickel", "onion", "parrot", "rocket",
         "salmon", "ticket", "velvet", "walnut", "almond", "barrel", "cactus", "donkey", "fabric",
         "glove", "honey", "insect", "jewel", "koala", "lantern", "meadow", "napkin", "oyster",
         "pillow", "radish", "spider", "turnip", "vessel", "whistle", "bottle", "cherry", "dragon",
         "falcon", "goblet", "hazel", "igloo", "jigsaw", "kernel", "lizard", "monkey", "nutmeg",
         "otter", "planet", "quarry", "ribbon", "shovel", "throne", "vacuum", "willow", "banana",
         "copper", "dinner", "flower", "grape", "hockey", "icicle", "juice", "kayak", "lobster",
         "muffin", "noodle", "olive", "puzzle", "raisin", "sponge", "tomato", "violet", "wizard",
         "biscuit", "circle", "domino", "fossil", "gravel", "hornet", "indigo", "jersey", "lagoon",
         "magnet", "nectar", "orchid", "pirate", "riddle", "sandal", "teapot", "vapor", "waffle"]

# (singular, plural, abbreviation) of each unit, and exact integer conversions between them
_UNIT_NAMES = {
    "km": ("kilometer", "kilometers"), "m": ("meter", "meters"), "cm": ("centimeter", "centimeters"),
    "mm": ("millimeter", "millimeters"), "t": ("tonne", "tonnes"), "kg": ("kilogram", "kilograms"),
    "g": ("gram", "grams"), "mg": ("milligram", "milligrams"), "d": ("day", "days"),
    "wk": ("week", "weeks"), "h": ("hour", "hours"), "min": ("minute", "minutes"),
    "s": ("second", "seconds"), "l": ("liter", "liters"), "ml": ("milliliter", "milliliters"),
    "ft": ("foot", "feet"), "in": ("inch", "inches"), "yd": ("yard", "yards"),
}
_CONVERSIONS = [("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("km", "cm", 100_000),
                ("t", "kg", 1000), ("kg", "g", 1000), ("g", "mg", 1000), ("wk", "d", 7), ("d", "h", 24),
                ("h", "min", 60), ("min", "s", 60), ("h", "s", 3600), ("l", "ml", 1000),
                ("yd", "ft", 3), ("ft", "in", 12), ("yd", "in", 36)]


# --- generators ---
def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_DATE_FORMATS: list[Callable[[int, int, int], str]] = [
    lambda y, m, d: f"{MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {MONTHS[m - 1]} {y}",
    lambda y, m, d: f"{d} {MONTH_ABBR[m - 1]} {y}",
    lambda y, m, d: f"{MONTH_ABBR[m - 1]} {d}, {y}",
    lambda y, m, d: f"{y}, {MONTHS[m - 1]} the {_ordinal(d)}",
    lambda y, m, d: f"the {_ordinal(d)} of {MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{WEEKDAYS[calendar.weekday(y, m, d)]}, {MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d:02d}/{m:02d}/{y} (day/month/year)",
    lambda y, m, d: f"{m:02d}/{d:02d}/{y} (month/day/year)",
    lambda y, m, d: f"{d}.{m}.{y} (day.month.year)",
    lambda y, m, d: f"{y}/{m}/{d} (year/month/day)",
]


def _dates(rng: random.Random) -> Example:
    year = rng.randint(1900, 2099)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    text = rng.choice(_DATE_FORMATS)(year, month, day)
    prompt = f"Rewrite this date in ISO 8601 format (YYYY-MM-DD): {text}"
    return Example(prompt, f"{year:04d}-{month:02d}-{day:02d}")


def _operand(rng: random.Random) -> int:
    digits = rng.randint(2, 4)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _arithmetic(rng: random.Random) -> Example:
    a, b = _operand(rng), _operand(rng)
    if rng.random() < 0.5:
        op, result = "+", a + b
    else:
        a, b = max(a, b), min(a, b)  # results stay non-negative
        op, result = "-", a - b
    return Example(f"What is {a} {op} {b}? Answer with the number only.", str(result))


def _unit(abbr: str, quantity: int) -> str:
    singular, plural = _UNIT_NAMES[abbr]
    return f"{quantity} {singular if quantity == 1 else plural}"


def _units(rng: random.Random) -> Example:
    big, small, factor = rng.choice(_CONVERSIONS)
    if rng.random() < 0.5:
        quantity = rng.randint(1, 999)
        src, dst, answer = _unit(big, quantity), _UNIT_NAMES[small][1], quantity * factor
    else:  # small -> big, chosen so the answer is a whole number
        answer = rng.randint(1, 99)
        src, dst = _unit(small, answer * factor), _UNIT_NAMES[big][1]
    return Example(f"Convert {src} to {dst}. Answer with the number only.", str(answer))


_PERSON_TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, {age}, lives in {city}.",
    "Meet {name} from {city}, who just turned {age}.",
    "At {age}, {name} still lives in {city}.",
    "{city} resident {name} ({age}) spoke at the town meeting.",
    "{name} has lived in {city} since childhood and is now {age}.",
    "Last week {name}, a {age}-year-old teacher, opened a bakery in {city}.",
]


def _extract(rng: random.Random) -> Example:
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    age, city = rng.randint(18, 90), rng.choice(CITIES)
    text = rng.choice(_PERSON_TEMPLATES).format(name=name, age=age, city=city)
    prompt = ("Extract the person's name, age and city from the text. Reply with compact JSON only: "
              '{"name":...,"age":...,"city":...} with the keys in this order, age as a number, '
              f"and no spaces outside the values.\nText: {text}")
    answer = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"))
    return Example(prompt, answer)


def _sort(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(4, 7))
    prompt = ("Sort these words alphabetically. Answer with the sorted words separated by spaces.\n"
              f"Words: {' '.join(words)}")
    return Example(prompt, " ".join(sorted(words)))


def _reverse(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 6))
    prompt = ("Reverse the order of these words. Answer with the words separated by spaces.\n"
              f"Words: {' '.join(words)}")
    return Example(prompt, " ".join(reversed(words)))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("dates", "a date in one of 11 human formats -> ISO 8601 (YYYY-MM-DD)", _dates),
        Task("arithmetic", "2-4 digit addition and subtraction -> the number", _arithmetic),
        Task("units", "exact metric/time/imperial unit conversion -> the whole number", _units),
        Task("extract", "a sentence about a person -> compact JSON with name, age, city", _extract),
        Task("sort", "4-7 words -> the words in alphabetical order", _sort),
        Task("reverse", "3-6 words -> the words in reverse order", _reverse),
    ]
}
DEFAULT_TASK = "dates"


def get_task(name: str) -> Task:
    """The built-in task called `name`; ValueError listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}") from None


def _derived_seed(*parts: object) -> int:
    """A stable 64-bit seed from the parts (independent of PYTHONHASHSEED)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_held_out(prompt: str) -> bool:
    """Whether `prompt` belongs to the test side of every split (a fixed 1/8 of prompts)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") % HELD_OUT_ONE_IN == 0


def task_split(name: str, split: str, n: int, seed: int = 0) -> list[Example]:
    """`n` distinct examples of task `name` for `split` ("train" or "test"), deterministic in `seed`.

    A prompt goes to the test side iff `is_held_out(prompt)`, so train and test never share a
    prompt, whatever the seeds and sizes. The first k examples of a split do not depend on `n`.
    """
    task = get_task(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    rng = random.Random(_derived_seed("loraplex.data", name, split, seed))
    want_test = split == "test"
    examples: list[Example] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 100 * n + 1000
    while len(examples) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"task {name!r}: could only generate {len(examples)} distinct {split} "
                             f"examples of the {n} asked for; ask for fewer")
        example = task.generate(rng)
        if example.prompt in seen or is_held_out(example.prompt) != want_test:
            continue
        seen.add(example.prompt)
        examples.append(example)
    return examples


def exact_match(prediction: str, reference: str) -> bool:
    """True when the first line of `prediction` equals `reference`, both stripped of whitespace.

    Leading blank lines of the prediction are ignored, so "\\n2021-03-05\\nbecause..." matches.
    """
    lines = prediction.strip().splitlines()
    first = lines[0].strip() if lines else ""
    return first == reference.strip()
