"""Unlearning evaluation: open-unlearning metrics, references, and the comparison report."""
