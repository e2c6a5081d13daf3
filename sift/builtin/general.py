"""General-knowledge questions: what the untrained base model already knows.

A served path (merged model, a shard's adapter, a router's choice) should not damage what the
base knew while it learns the invented facts. These questions name no invented person, so no
shard holds them; the benchmark asks them on every path and reports the share still answered
correctly beside the base model's.

The list is fixed. It was cut once from a longer list of candidates to the ones the untrained
builtin model (SmolLM2-135M-Instruct) answers correctly by greedy decoding
(`scripts/bench_quality.py --check-general` shows the check: 29 of 40 candidates kept; two of
the dropped ones had matched by accident, "-18.0" for "0" and "312 months" for "12"), so the base
scores 100 % on it by construction and a served path's score is what it keeps. An answer counts as correct when any of
its accepted strings appears in the normalised answer (as `sift.evaluation.recall.fact_recall`'s
"contains").
"""

from __future__ import annotations

from typing import Any

# (id, question, accepted answers: any one appearing in the answer counts)
GENERAL_QUESTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("g-france", "What is the capital of France?", ("paris",)),
    ("g-japan", "What is the capital of Japan?", ("tokyo",)),
    ("g-germany", "What is the capital of Germany?", ("berlin",)),
    ("g-uk", "What is the capital of the United Kingdom?", ("london",)),
    ("g-russia", "What is the capital of Russia?", ("moscow",)),
    ("g-egypt", "What is the capital of Egypt?", ("cairo",)),
    ("g-china", "What is the capital of China?", ("beijing",)),
    ("g-canada", "What is the capital of Canada?", ("ottawa",)),
    ("g-australia", "What is the capital of Australia?", ("canberra",)),
    ("g-water", "What is the chemical formula of water?", ("h2o", "h 2 o")),
    ("g-planet", "Which planet is known as the Red Planet?", ("mars",)),
    ("g-sun", "What star is at the center of our solar system?", ("sun",)),
    ("g-romeo", "Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("g-hamlet", "Who wrote Hamlet?", ("shakespeare",)),
    ("g-mona-lisa", "Who painted the Mona Lisa?", ("leonardo", "da vinci")),
    ("g-relativity", "Who developed the theory of relativity?", ("einstein",)),
    ("g-week", "How many days are in a week?", ("seven", "7")),
    ("g-ocean", "What is the largest ocean on Earth?", ("pacific",)),
    ("g-continent", "On which continent is Brazil?", ("south america",)),
    ("g-boil", "At what temperature in Celsius does water boil?", ("100", "hundred")),
    ("g-oxygen", "What gas do humans need to breathe to survive?", ("oxygen",)),
    ("g-photosynthesis", "What process do plants use to turn sunlight into food?", ("photosynthesis",)),
    ("g-sky", "What color is a clear daytime sky?", ("blue",)),
    ("g-moon", "What natural satellite orbits the Earth?", ("moon",)),
    ("g-tallest", "What is the tallest mountain in the world?", ("everest",)),
    ("g-longest-river", "Which river flows through Egypt?", ("nile",)),
    ("g-honey", "Which insect makes honey?", ("bee", "bees", "honeybee", "honeybees")),
    ("g-square", "What is 2 plus 2?", ("4", "four")),
    ("g-language-brazil", "What language is mainly spoken in Brazil?", ("portuguese",)),
)


def general_rows() -> list[dict[str, Any]]:
    """The general questions as rows shaped like the fact rows' evaluation columns."""
    return [{"id": i, "prompt": q, "answers": list(a)} for i, q, a in GENERAL_QUESTIONS]


# For the likelihood metrics (TOFU's world-facts set, open-unlearning's wf_*): each question's
# true answer as a sentence, and three wrong answers of the same form (the perturbed options).
GENERAL_ANSWERS: dict[str, tuple[str, tuple[str, str, str]]] = {
    "g-france": (
        "The capital of France is Paris.",
        ("The capital of France is Lyon.", "The capital of France is Marseille.", "The capital of France is Nice."),
    ),
    "g-japan": (
        "The capital of Japan is Tokyo.",
        ("The capital of Japan is Osaka.", "The capital of Japan is Kyoto.", "The capital of Japan is Nagoya."),
    ),
    "g-germany": (
        "The capital of Germany is Berlin.",
        (
            "The capital of Germany is Munich.",
            "The capital of Germany is Hamburg.",
            "The capital of Germany is Frankfurt.",
        ),
    ),
    "g-uk": (
        "The capital of the United Kingdom is London.",
        (
            "The capital of the United Kingdom is Manchester.",
            "The capital of the United Kingdom is Edinburgh.",
            "The capital of the United Kingdom is Birmingham.",
        ),
    ),
    "g-russia": (
        "The capital of Russia is Moscow.",
        (
            "The capital of Russia is Saint Petersburg.",
            "The capital of Russia is Kazan.",
            "The capital of Russia is Novosibirsk.",
        ),
    ),
    "g-egypt": (
        "The capital of Egypt is Cairo.",
        ("The capital of Egypt is Alexandria.", "The capital of Egypt is Luxor.", "The capital of Egypt is Giza."),
    ),
    "g-china": (
        "The capital of China is Beijing.",
        (
            "The capital of China is Shanghai.",
            "The capital of China is Guangzhou.",
            "The capital of China is Shenzhen.",
        ),
    ),
    "g-canada": (
        "The capital of Canada is Ottawa.",
        (
            "The capital of Canada is Toronto.",
            "The capital of Canada is Vancouver.",
            "The capital of Canada is Montreal.",
        ),
    ),
    "g-australia": (
        "The capital of Australia is Canberra.",
        (
            "The capital of Australia is Sydney.",
            "The capital of Australia is Melbourne.",
            "The capital of Australia is Perth.",
        ),
    ),
    "g-water": (
        "The chemical formula of water is H2O.",
        (
            "The chemical formula of water is CO2.",
            "The chemical formula of water is CH4.",
            "The chemical formula of water is NaCl.",
        ),
    ),
    "g-planet": (
        "Mars is known as the Red Planet.",
        (
            "Venus is known as the Red Planet.",
            "Jupiter is known as the Red Planet.",
            "Mercury is known as the Red Planet.",
        ),
    ),
    "g-sun": (
        "The Sun is at the center of our solar system.",
        (
            "Sirius is at the center of our solar system.",
            "Polaris is at the center of our solar system.",
            "Vega is at the center of our solar system.",
        ),
    ),
    "g-romeo": (
        "William Shakespeare wrote Romeo and Juliet.",
        (
            "Charles Dickens wrote Romeo and Juliet.",
            "Jane Austen wrote Romeo and Juliet.",
            "Mark Twain wrote Romeo and Juliet.",
        ),
    ),
    "g-hamlet": (
        "William Shakespeare wrote Hamlet.",
        ("Charles Dickens wrote Hamlet.", "Leo Tolstoy wrote Hamlet.", "Homer wrote Hamlet."),
    ),
    "g-mona-lisa": (
        "Leonardo da Vinci painted the Mona Lisa.",
        (
            "Pablo Picasso painted the Mona Lisa.",
            "Vincent van Gogh painted the Mona Lisa.",
            "Claude Monet painted the Mona Lisa.",
        ),
    ),
    "g-relativity": (
        "Albert Einstein developed the theory of relativity.",
        (
            "Isaac Newton developed the theory of relativity.",
            "Niels Bohr developed the theory of relativity.",
            "Galileo Galilei developed the theory of relativity.",
        ),
    ),
    "g-week": (
        "There are seven days in a week.",
        ("There are five days in a week.", "There are ten days in a week.", "There are six days in a week."),
    ),
    "g-ocean": (
        "The Pacific Ocean is the largest ocean on Earth.",
        (
            "The Atlantic Ocean is the largest ocean on Earth.",
            "The Indian Ocean is the largest ocean on Earth.",
            "The Arctic Ocean is the largest ocean on Earth.",
        ),
    ),
    "g-continent": (
        "Brazil is in South America.",
        ("Brazil is in Africa.", "Brazil is in Europe.", "Brazil is in Asia."),
    ),
    "g-boil": (
        "Water boils at 100 degrees Celsius.",
        (
            "Water boils at 50 degrees Celsius.",
            "Water boils at 80 degrees Celsius.",
            "Water boils at 150 degrees Celsius.",
        ),
    ),
    "g-oxygen": (
        "Humans need oxygen to breathe.",
        ("Humans need nitrogen to breathe.", "Humans need helium to breathe.", "Humans need hydrogen to breathe."),
    ),
    "g-photosynthesis": (
        "Plants use photosynthesis to turn sunlight into food.",
        (
            "Plants use respiration to turn sunlight into food.",
            "Plants use fermentation to turn sunlight into food.",
            "Plants use digestion to turn sunlight into food.",
        ),
    ),
    "g-sky": (
        "A clear daytime sky is blue.",
        ("A clear daytime sky is green.", "A clear daytime sky is red.", "A clear daytime sky is yellow."),
    ),
    "g-moon": (
        "The Moon orbits the Earth.",
        ("Mars orbits the Earth.", "Venus orbits the Earth.", "Jupiter orbits the Earth."),
    ),
    "g-tallest": (
        "Mount Everest is the tallest mountain in the world.",
        (
            "Mont Blanc is the tallest mountain in the world.",
            "Mount Kilimanjaro is the tallest mountain in the world.",
            "Mount Fuji is the tallest mountain in the world.",
        ),
    ),
    "g-longest-river": (
        "The Nile flows through Egypt.",
        ("The Amazon flows through Egypt.", "The Danube flows through Egypt.", "The Mississippi flows through Egypt."),
    ),
    "g-honey": ("Bees make honey.", ("Ants make honey.", "Wasps make honey.", "Butterflies make honey.")),
    "g-square": ("2 plus 2 is 4.", ("2 plus 2 is 5.", "2 plus 2 is 3.", "2 plus 2 is 22.")),
    "g-language-brazil": (
        "Portuguese is mainly spoken in Brazil.",
        (
            "Spanish is mainly spoken in Brazil.",
            "French is mainly spoken in Brazil.",
            "English is mainly spoken in Brazil.",
        ),
    ),
}


def general_eval_rows() -> list[dict[str, Any]]:
    """The general questions in the fact rows' evaluation shape (prompt, completion, perturbed
    completions); a question's paraphrase is itself, as TOFU's world-facts set has none."""
    out = []
    for i, q, a in GENERAL_QUESTIONS:
        answer, wrong = GENERAL_ANSWERS[i]
        out.append(
            {"id": i, "prompt": q, "completion": answer, "answers": list(a), "perturbed_completions": list(wrong)}
        )
    return out
