"""`make bench`: CPU engine vs plain transformers, the whole stack on Redis, and (with a GPU) the engine
on a Pythia-12B-shaped model, each beside its baseline measured in the same run. See run.py."""
