"""The embedded default: a synthetic fictitious-facts data set and the builtin base models."""
