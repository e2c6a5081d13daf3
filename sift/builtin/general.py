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
its accepted strings appears in the normalised answer (as `sift.evaluate.fact_recall`'s
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
