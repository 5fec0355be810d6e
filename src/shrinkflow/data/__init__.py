"""Data sets: download, prepare, and the prepared split every backend reads."""
