"""Synthetic six-domain English corpus for the shipped demo model.

Why synthetic: the demo must build offline and deterministically, and its SAE features should
be easy to recognise (finance terms, sports scores, recipes...). Each domain has many sentence
templates with slot fillers; a document is 3-7 sentences of one domain, so the model learns to
continue a prompt in its domain and the SAEs find domain- and token-level features.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

COMPANIES = ["ACME Corp", "Globex", "Initech", "Umbrella Holdings", "Stark Industries", "Wayne Enterprises",
             "Hooli", "Vandelay Imports", "Soylent Foods", "Cyberdyne Systems", "Tyrell Group", "Wonka Brands"]
QUARTERS = ["Q1", "Q2", "Q3", "Q4"]
KPIS = ["revenue", "operating margin", "gross margin", "free cash flow", "EPS", "net income", "EBITDA",
        "same-store sales", "subscriber growth", "average revenue per user", "churn", "backlog"]
DRIVERS = ["pricing power", "cost discipline", "higher volumes", "a favorable product mix", "lower input costs",
           "strong demand in North America", "currency headwinds", "supply chain savings", "cloud adoption"]
TEAMS = ["the Falcons", "the Rovers", "the Tigers", "the Comets", "the Harbor City Kings", "the Mariners",
         "the Wolves", "the Pioneers", "the Titans", "the Lakers of Elm Bay"]
PLAYERS = ["Jordan Miles", "Alex Romero", "Sam Carter", "Chris Okafor", "Taylor Brooks", "Jamie Lee",
           "Morgan Diaz", "Riley Chen", "Casey Novak", "Drew Patel"]
SPORT_ACTS = ["scored twice", "hit a late three-pointer", "made a diving save", "ran for two touchdowns",
              "struck out nine batters", "set up the winning goal", "blocked a penalty kick"]
DISHES = ["tomato soup", "chicken curry", "lemon cake", "mushroom risotto", "beef stew", "garlic bread",
          "banana pancakes", "vegetable lasagna", "apple pie", "fried rice"]
INGREDIENTS = ["butter", "garlic", "onions", "flour", "sugar", "olive oil", "fresh basil", "two eggs",
               "a pinch of salt", "black pepper", "grated cheese", "chopped carrots", "cream"]
COOK_VERBS = ["stir", "whisk", "simmer", "bake", "chop", "fold in", "season", "saute", "roast"]
LANGS = ["Python", "Rust", "JavaScript", "Go", "Java", "C++", "TypeScript", "SQL"]
CODE_THINGS = ["function", "class", "loop", "variable", "unit test", "API endpoint", "database query",
               "list comprehension", "hash map", "compiler error", "pull request", "stack trace"]
CODE_VERBS = ["refactor", "debug", "deploy", "compile", "test", "profile", "document", "optimize"]
CITIES = ["Boston", "Denver", "Seattle", "Chicago", "Austin", "Miami", "Portland", "Phoenix", "Atlanta"]
WEATHER = ["heavy rain", "light snow", "scattered showers", "strong winds", "clear skies", "thick fog",
           "thunderstorms", "a heat wave", "freezing drizzle", "partly cloudy skies"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "tonight", "tomorrow"]
SYMPTOMS = ["fever", "a persistent cough", "chest pain", "fatigue", "headaches", "shortness of breath",
            "joint pain", "nausea", "dizziness", "a skin rash"]
DRUGS = ["ibuprofen", "amoxicillin", "metformin", "lisinopril", "insulin", "a statin", "an antihistamine"]
CONDITIONS = ["diabetes", "hypertension", "asthma", "pneumonia", "migraine", "arthritis", "an infection"]

TEMPLATES: dict[str, list[str]] = {
    "finance": [
        "{co} reported {q} revenue of ${bn} billion, up {pct}% year over year.",
        "{co} posted {q} EPS of ${eps}, beating analyst estimates by ${cents}.",
        "EPS came in at ${eps} versus a consensus of ${eps2}.",
        "Management raised full-year guidance, citing {driver}.",
        "Management cut guidance for the fiscal year because of {driver}.",
        "Gross margin expanded {bps} basis points to {pct}% on {driver}.",
        "Operating margin contracted to {pct}% as costs rose faster than revenue.",
        "The key KPIs were {kpi}, {kpi2} and {kpi3}.",
        "{kpi} grew {pct}% in {q}, while {kpi2} was flat.",
        "Shares of {co} rose {pct}% after the earnings call.",
        "Shares of {co} fell {pct}% after the company missed on {kpi}.",
        "Analysts expect revenue growth of {pct}% next quarter.",
        "The board approved a ${bn} billion share buyback and raised the dividend.",
        "Free cash flow reached ${bn} billion, and net debt declined.",
        "In the {q} earnings report, {co} highlighted {kpi} as the main driver of profit.",
        "The stock market rallied as investors weighed earnings, inflation and interest rates.",
        "Margin drivers included {driver} and {driver2}.",
    ],
    "sports": [
        "{team} beat {team2} {s1} to {s2} on {day}.",
        "{player} {act} as {team} won the championship game.",
        "{team} lost to {team2} after {player} {act} in overtime.",
        "The coach praised the defense and said the team played with energy.",
        "{player} leads the league with {n} goals this season.",
        "Fans filled the stadium to watch {team} face {team2}.",
        "{team} will play {team2} in the playoffs next {day}.",
        "{player} was named player of the match after he {act}.",
        "The referee showed a red card in the second half.",
        "{team} signed {player} to a three-year contract.",
        "After the final whistle, {team} celebrated a {s1} to {s2} victory.",
        "The season ended with {team} at the top of the table.",
    ],
    "cooking": [
        "To make {dish}, {verb} {ing} with {ing2} in a large pan.",
        "Preheat the oven to {temp} degrees and {verb} the {dish} for {mins} minutes.",
        "Add {ing} and {ing2}, then {verb} gently.",
        "This {dish} recipe serves {n} people and takes {mins} minutes.",
        "Season the {dish} with {ing} before serving.",
        "{verb} the mixture until it is smooth, then add {ing}.",
        "Let the {dish} rest for {mins} minutes before you slice it.",
        "For a richer flavor, {verb} {ing} into the sauce.",
        "Serve the {dish} warm with {ing} on top.",
        "The secret to a good {dish} is fresh {ing2} and patience.",
        "Melt the {ing} over low heat and {verb} in the {ing2}.",
    ],
    "programming": [
        "In {lang}, a {thing} can be used to {cverb} the code more easily.",
        "We need to {cverb} the {thing} before the release.",
        "The {thing} threw an exception, so I opened the debugger.",
        "Write a {thing} in {lang} that returns the sum of a list.",
        "The {lang} compiler reported an error on line {n}.",
        "After we {cverb} the {thing}, the tests passed.",
        "Use a {thing} to cache results and avoid repeated work.",
        "The pull request adds a {thing} and updates the documentation.",
        "Our {lang} service handles {n} requests per second.",
        "Remember to {cverb} every {thing} and check the return value.",
        "The function returns None when the input list is empty.",
        "Run the unit tests with the command line before you merge.",
    ],
    "weather": [
        "The forecast for {city} calls for {wx} on {day}.",
        "Temperatures in {city} will reach {temp2} degrees {day}.",
        "A cold front will bring {wx} to {city} and nearby towns.",
        "Expect {wx} in the morning and {wx2} in the afternoon.",
        "The national weather service issued a warning for {wx} in {city}.",
        "Winds of {n} miles per hour are expected along the coast.",
        "{city} recorded {n} inches of rain this week.",
        "Humidity will stay high, with a chance of {wx} {day}.",
        "The weekend looks dry in {city}, with {wx2} and mild temperatures.",
        "Meteorologists say {wx} will move east by {day}.",
    ],
    "medicine": [
        "The patient presented with {sym} and {sym2}.",
        "The doctor prescribed {drug} for {cond}.",
        "Patients with {cond} often report {sym}.",
        "Take {drug} twice a day with food, the nurse explained.",
        "The clinical trial showed that {drug} reduced {sym} in {pct}% of patients.",
        "Blood pressure was {bp1} over {bp2} at the follow-up visit.",
        "The physician ordered a blood test to rule out {cond}.",
        "Side effects of {drug} may include {sym} and {sym2}.",
        "Early diagnosis of {cond} improves outcomes for most patients.",
        "The hospital admitted the patient with {cond} and {sym}.",
        "Rest, fluids and {drug} are recommended for {sym}.",
    ],
}
DOMAINS = list(TEMPLATES)


def _fill(rng: random.Random, template: str) -> str:
    """Fill every slot of one template; slots with a trailing 2/3 draw a distinct value."""
    def pick(options: list[str], *avoid: str) -> str:
        choice = rng.choice(options)
        while choice in avoid and len(options) > len(avoid):
            choice = rng.choice(options)
        return choice

    kpi, drv, team, ing, wx, sym = (pick(KPIS), pick(DRIVERS), pick(TEAMS), pick(INGREDIENTS),
                                    pick(WEATHER), pick(SYMPTOMS))
    kpi2 = pick(KPIS, kpi)
    values = {
        "co": pick(COMPANIES), "q": pick(QUARTERS), "kpi": kpi, "kpi2": kpi2, "kpi3": pick(KPIS, kpi, kpi2),
        "driver": drv, "driver2": pick(DRIVERS, drv), "bn": f"{rng.randint(1, 90)}.{rng.randint(0, 9)}",
        "pct": str(rng.randint(2, 45)), "eps": f"{rng.randint(0, 6)}.{rng.randint(10, 99)}",
        "eps2": f"{rng.randint(0, 6)}.{rng.randint(10, 99)}", "cents": f"0.{rng.randint(1, 30):02d}",
        "bps": str(rng.choice([20, 40, 60, 80, 120, 150])),
        "team": team, "team2": pick(TEAMS, team), "player": pick(PLAYERS), "act": pick(SPORT_ACTS),
        "s1": str(rng.randint(3, 9)), "s2": str(rng.randint(0, 2)), "day": pick(DAYS),
        "n": str(rng.randint(2, 40)), "dish": pick(DISHES), "ing": ing, "ing2": pick(INGREDIENTS, ing),
        "verb": pick(COOK_VERBS), "temp": str(rng.choice([325, 350, 375, 400, 425])),
        "mins": str(rng.choice([5, 10, 15, 20, 30, 45, 60])), "lang": pick(LANGS), "thing": pick(CODE_THINGS),
        "cverb": pick(CODE_VERBS), "city": pick(CITIES), "wx": wx, "wx2": pick(WEATHER, wx),
        "temp2": str(rng.randint(10, 99)), "sym": sym, "sym2": pick(SYMPTOMS, sym), "drug": pick(DRUGS),
        "cond": pick(CONDITIONS), "bp1": str(rng.randint(105, 165)), "bp2": str(rng.randint(65, 100)),
    }
    text = template.format(**values)
    return text[0].upper() + text[1:]


def documents(seed: int, n_docs: int, domains: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """Yield ``(domain, text)`` documents, deterministic in ``seed``."""
    rng = random.Random(seed)
    pool = domains or DOMAINS
    for _ in range(n_docs):
        domain = rng.choice(pool)
        templates = TEMPLATES[domain]
        sentences = [_fill(rng, rng.choice(templates)) for _ in range(rng.randint(3, 7))]
        yield domain, " ".join(sentences)
