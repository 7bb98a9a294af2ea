"""training: the headless APT trainer (config, data loading, distributed setup); imports apt_core only."""
