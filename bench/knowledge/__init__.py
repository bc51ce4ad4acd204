"""Knowledge harness: measures whether a trained doclora bot knows its documents (see run.py)."""
