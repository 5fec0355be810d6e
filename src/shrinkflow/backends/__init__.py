"""Framework backends, imported lazily so a job only pays for its own framework."""
