"""Approximate unlearning baselines (gradient ascent, GradDiff, NPO, SimNPO, NGDiff), applied to
one model trained on every row. They are what exact forgetting is compared against; nothing they
produce is ever recorded as an exact forget."""
