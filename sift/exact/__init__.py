"""The exact path: forget (retrain or drop the affected shards and re-merge), verify (rebuild
from scratch and compare every byte) and audit (search for anything of the forgotten rows)."""
