"""Regenerate `builtin_corpus.jsonl`, the small offline corpus shipped for demos and tests.

The documents come from a small recursive grammar (`{slot}` expands to a random alternative; `{Slot}` the
same, capitalised) plus a few computed kinds (arithmetic, dates, code). A fixed seed makes the output
byte-identical on every run, and a test checks the shipped file against it: after editing the grammar,
run `python -m workers.activations.data.make_builtin_corpus`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 1729
OUTPUT = Path(__file__).with_name("builtin_corpus.jsonl")
#: How many documents of each kind; they are shuffled together so any prefix is a mix.
RECIPE: dict[str, int] = {"news": 280, "encyclopedia": 280, "howto": 130, "story": 200,
                          "numbers": 220, "code": 120, "chat": 360}

FIRST = ["Amara", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi",
         "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Samir", "Tessa", "Umar", "Vera",
         "Wen", "Ximena", "Yusuf", "Zoe", "Aiko", "Bruno", "Carmen", "Dev", "Esther", "Felix"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Petrov", "Haddad", "Tanaka", "Alvarez", "Mensah", "Novak",
        "Fischer", "Costa", "Rahman", "Walsh", "Kowalski", "Nakamura", "Osei", "Brennan", "Sato", "Ibarra",
        "Mueller", "Quist", "Delgado", "Varga", "Holt"]
SYLLABLES = ["ar", "bel", "cor", "dan", "el", "fen", "gar", "hol", "is", "jor", "kel", "lun", "mar", "nor",
             "ost", "pel", "quin", "ros", "sal", "tor", "ul", "ven", "wil", "yar", "zen"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
#: device -> (what it does, what early ones were made of, what modern ones use)
DEVICES = {
    "sundial": ("shows the time using the shadow of a pointer", "stone", "bronze or slate"),
    "barometer": ("measures changes in air pressure", "glass and mercury", "sealed metal capsules"),
    "water wheel": ("turns the energy of flowing water into motion", "wood", "steel"),
    "printing press": ("presses inked type onto paper", "wood", "steel and electric motors"),
    "telescope": ("makes distant objects look closer", "brass and glass", "aluminium and coated mirrors"),
    "thermostat": ("keeps a room at a steady temperature", "bimetal strips", "electronic sensors"),
    "loom": ("weaves thread into cloth", "wood", "steel frames driven by motors"),
    "compass": ("shows which way is north", "magnetised iron needles", "liquid-filled plastic capsules"),
    "metronome": ("marks a steady beat for musicians", "wood and clockwork", "quartz electronics"),
    "pressure cooker": ("cooks food quickly in trapped steam", "cast iron", "stainless steel"),
}

GRAMMAR: dict[str, list[str]] = {
    # --- news -------------------------------------------------------------------------------------------
    "news": ["{news_lead} {news_detail} {news_quote} {news_close}", "{news_lead} {news_quote} {news_detail}",
             "{news_lead} {news_detail} {news_detail2} {news_close}"],
    "news_lead": ["{Town}, {weekday}: {org} announced that it will {action}, {reason}.",
                  "{Org} in {town} has agreed to {action} {when}, {reason}.",
                  "Plans to {action} were approved by {org} on {weekday} after a {adj_long} debate.",
                  "Residents of {town} will see changes {when} as {org} moves to {action}."],
    "org": ["the city council", "the regional water authority", "the transport authority", "the university",
            "a wind energy cooperative", "the harbour board", "the county government", "the school district",
            "the public library service", "the ministry of transport", "the town's development agency"],
    "action": ["expand its night bus service", "close two branch offices", "open a new health centre",
               "raise ticket prices by {pct} percent", "plant {n} trees along the river",
               "replace its ageing fleet of trams", "build {n} affordable homes", "cut its energy use",
               "extend opening hours on weekends", "repair the old stone bridge", "hire {n} new staff",
               "move its offices to the old docks", "offer free swimming lessons to children"],
    "reason": ["citing rising costs", "after a year of public consultation", "to meet new safety rules",
               "following complaints from residents", "in response to record demand",
               "despite objections from some shop owners", "as part of a ten-year plan"],
    "when": ["next spring", "by the end of the year", "within {n} months", "from {month}", "this decade"],
    "news_detail": ["The project is expected to cost about {money} and take {n} months to complete.",
                    "Officials said the first phase would begin in {month}.",
                    "A survey last year found that {pct} percent of residents supported the idea.",
                    "Similar schemes in {town} and {town} have had mixed results.",
                    "The decision follows a report that described current facilities as {adj_bad}."],
    "news_detail2": ["Opposition members said they would examine the figures closely.",
                     "Local businesses expect more visitors once the work is finished.",
                     "Some residents remain worried about noise during construction.",
                     "Funding will come partly from a national grant and partly from local taxes."],
    "news_quote": ['"{quote}," said {name}, a spokesperson for {org}.', '"{quote}," {name} told reporters.',
                   '{Name}, who has lived in {town} for {n} years, said: "{quote}"'],
    "quote": ["We listened to what people told us", "This is a first step, not the last",
              "It has taken far too long, but we are glad it is finally happening",
              "Nobody wants to pay more, but the service has to be safe",
              "Our children deserve better than what they have now",
              "We will keep a close eye on the budget"],
    "news_close": ["A public meeting is planned for {weekday} evening.",
                   "Further details will be published online.", "Work is due to start in {month}.",
                   "The council will vote on the final budget in {month}."],
    "adj_long": ["long", "heated", "three-hour", "lively", "careful"],
    "adj_bad": ["outdated", "overcrowded", "unsafe in places", "expensive to run", "badly in need of repair"],
    # --- encyclopedia -----------------------------------------------------------------------------------
    "encyclopedia": ["{species}", "{species}", "{townpage}", "{device_page}"],
    "species": ["The {colour}-{part} {bird} ({Latin}) is a {size} bird found in {habitat} across {region}. "
                "It feeds mainly on {bird_food} and is most active {activity}. {species_note}",
                "The {colour}-{part} {mammal} ({Latin}) is a {size} mammal of {habitat} in {region}. "
                "It eats {mammal_food} and shelters {shelter}. {species_note}",
                "The {colour} {reptile} ({Latin}) is a {size} reptile living among {habitat} in {region}. "
                "It hunts {reptile_food} {activity}. {species_note}"],
    "colour": ["red", "grey", "golden", "black", "blue", "spotted", "striped", "pale", "copper"],
    "part": ["throated", "tailed", "winged", "crested", "backed", "eared", "bellied"],
    "bird": ["warbler", "finch", "heron", "owl", "swift", "kingfisher", "lark"],
    "mammal": ["shrew", "vole", "bat", "squirrel", "hare", "marten"],
    "reptile": ["gecko", "skink", "lizard", "tortoise", "snake"],
    "size": ["small", "medium-sized", "slender", "stocky", "tiny", "large"],
    "habitat": ["wet meadows", "pine forests", "rocky coasts", "mountain streams", "dry grasslands"],
    "region": ["northern Europe", "the southern highlands", "the eastern islands", "central Asia",
               "the western plains", "the Andes", "the Great Rift Valley"],
    "bird_food": ["insects", "seeds and berries", "small fish", "nectar", "worms and beetles"],
    "mammal_food": ["seeds and roots", "insects and spiders", "grasses", "fruit and nuts"],
    "reptile_food": ["crickets and beetles", "snails", "small rodents", "ants"],
    "shelter": ["in hollow trees", "in burrows under the roots", "among rocks", "in old stone walls"],
    "activity": ["at dawn and dusk", "at night", "during the warmest part of the day", "after heavy rain"],
    "species_note": ["Its population is considered stable.", "It was first described in {year}.",
                     "Habitat loss has made it rare in some areas.", "It raises two to four young a year.",
                     "Little is known about how far it travels in winter."],
    "townpage": ["{Place} is a market town in {region}, on the {side} bank of the River {Place}. "
                 "It had a population of {big} at the {year} census. {town_note} {town_note2}"],
    "side": ["north", "south", "east", "west"],
    "town_note": ["The town grew around a wool market in the {century} century.",
                  "Its railway station opened in {year}.", "The economy depends on farming and tourism.",
                  "The old town hall now houses a museum of local history."],
    "town_note2": ["A music festival is held every {month}.", "The town is twinned with {Place}.",
                   "Its stone bridge is one of the oldest in the country."],
    "century": ["twelfth", "fourteenth", "sixteenth", "eighteenth"],
    "device_page": [f"A {d} is a device that {p}. Early versions were made of {old}, while modern ones use "
                    f"{new}. {{device_note}}" for d, (p, old, new) in DEVICES.items()],
    "device_note": ["It became common in households during the {century} century.",
                    "Its basic design has changed little in a hundred years.",
                    "Collectors value early examples highly."],
    # --- stories (prose dialogue); each exchange keeps its question and answer together -------------
    "story": ["{Name} found {name2} {spot}. {exchange} {story_end}"],
    "spot": ["in the kitchen", "at the bus stop", "on the back steps", "in the library",
             "by the harbour wall", "in the garden", "at the station café"],
    "exchange": ['"Have you seen my keys?" {pron} asked. {Name2} {gesture}. "They were on the table."',
                 '"Are you coming tonight?" {pron} asked. {Name2} {gesture}. "I might be a little late."',
                 '"Did the letter arrive?" {pron} asked. {Name2} {gesture}. "Not yet. Maybe tomorrow."',
                 '"Is it going to rain again?" {pron} asked. {Name2} {gesture}. "Only until lunch."',
                 '"What are you reading?" {pron} asked. {Name2} {gesture}. "A book about old ships."',
                 '"Why is the door open?" {pron} asked. {Name2} {gesture}. "I needed some fresh air."'],
    "pron": ["she", "he"],
    "gesture": ["looked up and smiled", "shrugged", "put down the cup", "thought for a moment",
                "laughed quietly", "did not look up"],
    "story_end": ["Outside, the wind picked up.", "Neither of them mentioned it again.",
                  "They walked home together in the evening light.", "The clock on the wall struck {small}."],
    # --- shared -----------------------------------------------------------------------------------------
    "town": ["{Place}", "Lisbon", "Nairobi", "Osaka", "Bergen", "Valparaíso", "Leeds", "Hanoi", "Tartu",
             "Cork", "Porto", "Dunedin"],
}

HOWTO: dict[str, list[str]] = {
    "repot a houseplant": ["Water the plant a day before.", "Choose a pot one size larger.",
                           "Ease the plant out and loosen the roots.", "Set it on fresh compost.",
                           "Fill around the roots, press gently and water well."],
    "make a cup of tea": ["Boil fresh water.", "Warm the teapot or mug.", "Add one teabag per cup.",
                          "Pour on the water and wait three to five minutes.",
                          "Remove the bag and add milk if you like."],
    "change a bicycle tyre": ["Open the brake and remove the wheel.", "Lever the tyre off the rim.",
                              "Pull out the old tube and check the tyre for thorns.",
                              "Fit a new tube, slightly inflated.", "Push the tyre back on and pump it up."],
    "write a cover letter": ["Read the job advert twice.", "Open with the role you are applying for.",
                             "Give two examples that match what they ask for.",
                             "Explain why you want this job.", "Close politely and check the spelling."],
    "bake bread": ["Mix flour, salt, yeast and warm water.", "Knead the dough for ten minutes.",
                   "Let it rise until doubled.", "Shape the loaf and let it rise again.",
                   "Bake at 220 °C for about thirty minutes."],
    "back up photos": ["Pick an external drive or a cloud service.", "Copy the photo folders to it.",
                       "Check that a few files open from the copy.", "Keep a second copy elsewhere.",
                       "Repeat the backup every month."],
    "plan a budget": ["Write down your monthly income.", "List fixed costs such as rent and bills.",
                      "Track what you spend for a month.", "Set a limit for each category.",
                      "Review the numbers at the end of the month."],
    "clean a cast-iron pan": ["Rinse it with hot water while it is still warm.", "Scrub with a stiff brush.",
                              "Dry it completely on the stove.", "Rub in a thin layer of oil.",
                              "Store it in a dry place."],
    "start running": ["Get shoes that fit well.", "Begin with a mix of walking and jogging.",
                      "Run three times a week, not every day.", "Add a few minutes each week.",
                      "Rest when something hurts."],
    "learn new words in a language": ["Pick ten words a day.", "Write each in a sentence of your own.",
                                      "Review them the next day and after a week.", "Say them out loud.",
                                      "Use them in a short conversation."],
}
HOWTO_TIPS = ["Take your time; rushing is the most common mistake.", "It gets easier the second time.",
              "Ask someone experienced if you are unsure.", "Keep notes so you can repeat what worked.",
              "Read all the steps before you begin.", "Do not worry if the first attempt is not perfect.",
              "Clean up as you go and the last step is much quicker.", "Teaching it to a friend helps."]
HOWTO_INTROS = ["To {task}, you need a little patience.", "Here is how to {task} without fuss.",
                "Many people never learn to {task}, but it is not hard.", "{Name} explains how to {task}.",
                "A short guide for anyone who wants to {task}.", "Want to {task}? Follow these steps."]
ORDINALS = ["First", "Next", "Then", "After that", "Finally"]


def _place(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _date(rng: random.Random) -> dt.date:
    return dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(27_000))


SPECIAL: dict[str, Callable[[random.Random], str]] = {
    "name": _name, "name2": _name, "place": _place,
    "latin": lambda r: f"{_place(r)} {_place(r).lower()}us",
    "n": lambda r: str(r.choice([3, 4, 6, 8, 12, 15, 18, 24, 40, 120, 300, 1500])),
    "small": lambda r: str(r.randint(2, 12)), "pct": lambda r: str(r.randint(3, 85)),
    "big": lambda r: f"{r.randint(2_000, 90_000):,}", "year": lambda r: str(r.randint(1780, 2022)),
    "money": lambda r: f"{r.choice(['€', '$', '£'])}{r.randint(2, 95)}.{r.randint(0, 9)} million",
    "month": lambda r: r.choice(MONTHS), "weekday": lambda r: r.choice(WEEKDAYS),
}


def expand(text: str, rng: random.Random, bound: dict[str, str] | None = None) -> str:
    """Replace each `{slot}` by a random alternative, recursively; `{Slot}` capitalises the result.

    Slots in `bound` keep one value throughout a document (the same person in every sentence).
    """
    bound = bound or {}

    def one(match: re.Match[str]) -> str:
        slot = match.group(1)
        key = slot[0].lower() + slot[1:]
        if key in bound:
            value = bound[key]
        else:
            value = SPECIAL[key](rng) if key in SPECIAL else expand(rng.choice(GRAMMAR[key]), rng, bound)
        return value[0].upper() + value[1:] if slot[0].isupper() else value

    return re.sub(r"\{(\w+)\}", one, text)


def howto(rng: random.Random) -> str:
    task, steps = rng.choice(sorted(HOWTO.items()))
    intro = expand(rng.choice(HOWTO_INTROS), rng, {"task": task, "name": rng.choice(FIRST)})
    if rng.random() < 0.5:
        intro += f" Time needed: about {rng.choice([5, 10, 15, 20, 30, 45, 60, 90])} minutes."
    if rng.random() < 0.5:
        body = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
        return f"How to {task}\n{intro}\n{body}\n{rng.choice(HOWTO_TIPS)}"
    body = " ".join(f"{o}, {s[0].lower()}{s[1:]}" for o, s in zip(ORDINALS, steps, strict=True))
    return f"{intro} {body} {rng.choice(HOWTO_TIPS)}"


def numbers(rng: random.Random) -> str:
    day, place, kind = _date(rng), _place(rng), rng.randrange(5)
    if kind == 0:
        high = rng.randint(-5, 34)
        sky = rng.choice(["sunny", "cloudy", "light rain", "showers", "fog in the morning", "snow"])
        return (f"Weather for {place}, {day:%A %d %B %Y}: high of {high} °C, "
                f"low of {high - rng.randint(3, 11)} °C, {sky}. Wind {rng.choice(['north', 'east', 'west'])} "
                f"at {rng.randint(5, 60)} km/h; chance of rain {rng.randint(0, 100)}%.")
    if kind == 1:
        revenue, change = rng.randint(120, 9_800) / 10, rng.randint(-150, 250) / 10
        quarter = rng.choice(["first", "second", "third", "fourth"])
        return (f"{place} Holdings reported revenue of ${revenue:,.1f} million for the {quarter} quarter of "
                f"{day.year}, {'up' if change >= 0 else 'down'} {abs(change):.1f}% from a year earlier. "
                f"It employs {rng.randint(40, 5_000):,} people.")
    if kind == 2:
        home, away = rng.randint(0, 5), rng.randint(0, 5)
        result = "A draw" if home == away else "The home side won" if home > away else "An away win"
        moment = rng.choice(["a quiet first half", "an early goal", "a late penalty", "a red card"])
        return (f"{place} Rovers {home}–{away} {_place(rng)} United, {day:%d %B %Y}. "
                f"Attendance: {rng.randint(800, 45_000):,}. {result} after {moment}.")
    if kind == 3:
        years = sorted(rng.sample(range(1700, 2020), 4))
        events = ["founded", *rng.sample(["first school opened", "great flood", "railway arrived",
                                          "new bridge built", "factory closed", "museum opened"], 3)]
        return f"Timeline of {place}:\n" + "\n".join(f"{y} – {e}" for y, e in zip(years, events, strict=True))
    start, people = rng.randint(1950, 2010), rng.randint(5_000, 80_000)
    rows = []
    for i in range(4):
        rows.append(f"{start + 5 * i},{people}")
        people = int(people * (1 + rng.randint(-4, 9) / 100))
    return f"Population of {place} (census):\nyear,people\n" + "\n".join(rows)


def code(rng: random.Random) -> str:
    items = rng.choice(["values", "prices", "scores", "numbers", "readings", "weights"])
    fn = rng.choice(["total", "average", "largest", "count_positive", "normalise"])
    bodies = {"total": f"    return sum({items})",
              "average": f"    if not {items}:\n        return 0.0\n    return sum({items}) / len({items})",
              "largest": f"    best = {items}[0]\n    for x in {items}[1:]:\n        if x > best:\n"
                         "            best = x\n    return best",
              "count_positive": f"    return sum(1 for x in {items} if x > 0)",
              "normalise": f"    top = max({items})\n    return [x / top for x in {items}]"}
    kind = rng.randrange(4)
    if kind == 0:
        name = f"{rng.choice(['', 'get_', 'compute_', 'find_'])}{fn}_{items}"
        signature = rng.choice([items, f"{items}: list[float]", f"{items}: list[int]"])
        doc = rng.choice([f"{fn.replace('_', ' ').capitalize()} of the {items}.",
                          f"Used by the {_place(rng)} report."])
        return f'def {name}({signature}):\n    """{doc}"""\n' + bodies[fn]
    if kind == 1:
        field, limit = rng.choice(["age", "price", "score", "year"]), rng.randint(2, 500)
        return (f"SELECT name, {field}\nFROM {items}\nWHERE {field} > {limit}\n"
                f"ORDER BY {field} DESC\nLIMIT {rng.randint(5, 50)};")
    if kind == 2:
        factor = rng.randint(2, 9)
        return f"const scale = ({items}) => {items}.map((x) => x * {factor});\nconsole.log(scale([1, 2, 3]));"
    folder = rng.choice(["data", "logs", "reports", "exports", "backup"])
    return (f"for f in {folder}/*.{rng.choice(['txt', 'csv', 'log'])}; do\n  wc -l \"$f\"\n"
            f"done | sort -n | tail -n {rng.randint(3, 20)}")


def chat(rng: random.Random) -> list[dict[str, str]]:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        turns = [f"What is {a} times {b}?", f"{a} × {b} = {a * b}."]
    elif kind == 1:
        km = rng.randint(1, 500)
        turns = [f"How many miles is {km} km?", f"{km} km is about {km * 0.621371:.1f} miles."]
    elif kind == 2:
        day = _date(rng)
        turns = [f"What day of the week was {day:%d %B %Y}?", f"{day:%d %B %Y} was a {day:%A}."]
    elif kind == 3:
        task, steps = rng.choice(sorted(HOWTO.items()))
        numbered = "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))
        turns = [f"How do I {task}?", f"Here is a simple way:\n{numbered}"]
    elif kind == 4:
        device, (purpose, old, new) = rng.choice(sorted(DEVICES.items()))
        turns = [f"Can you explain what a {device} does?",
                 f"Sure. A {device} {purpose}. Early ones were made of {old}; modern ones use {new}."]
    elif kind == 5:
        what = rng.choice(["sum", "average", "largest value", "number of positive values"])
        turns = [f"Write a Python function that returns the {what} of a list.", code(rng)]
    else:
        turns = [f"Hi! I'm visiting {expand('{town}', rng)} in {rng.choice(MONTHS)}. Any tips?",
                 expand("Lovely choice. Pack for changeable weather, try the local bakeries, and visit "
                        "the old town early before it gets busy. A festival is often held in {month}.", rng)]
    if rng.random() < 0.4:  # some multi-turn conversations, as in real chat data
        turns += [rng.choice(["Thanks!", "Great, thank you.", "That helps a lot."]),
                  rng.choice(["You're welcome!", "Glad I could help.", "Happy to help. Anything else?"])]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if rng.random() < 0.25:
        messages.insert(0, {"role": "system", "content": "You are a helpful, concise assistant."})
    return messages


GENERATORS: dict[str, Callable[[random.Random], Any]] = {
    "news": lambda r: expand("{news}", r, {"org": expand("{org}", r)}),
    "encyclopedia": lambda r: expand("{encyclopedia}", r),
    "story": lambda r: expand("{story}", r, {"name": r.choice(FIRST), "name2": r.choice(FIRST)}),
    "howto": howto, "numbers": numbers, "code": code, "chat": chat,
}


def build_records(seed: int = SEED) -> list[dict[str, Any]]:
    """The corpus records in order: `{"kind", "text"}` or `{"kind", "messages"}`, no exact duplicates."""
    rng = random.Random(seed)
    kinds = [kind for kind, count in RECIPE.items() for _ in range(count)]
    rng.shuffle(kinds)
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for kind in kinds:
        for _ in range(100):  # redraw duplicates: repeated documents would over-weight a few contexts
            content = GENERATORS[kind](rng)
            key = json.dumps(content, ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                break
        else:
            raise RuntimeError(f"the '{kind}' grammar is too small for {RECIPE[kind]} distinct documents")
        records.append({"kind": kind, "messages" if isinstance(content, list) else "text": content})
    return records


def render(records: list[dict[str, Any]]) -> str:
    """The records as JSON Lines, keys sorted, non-ASCII characters kept as they are."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def main(argv: list[str] | None = None) -> None:
    """Write the corpus (to the shipped location by default) and print its size."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write the .jsonl file")
    args = parser.parse_args(argv)
    text = render(build_records())
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {text.count(chr(10))} documents, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
