"""shrinkflow."""
