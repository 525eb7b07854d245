"""The main job (``cacheaug demo`` / launchers/quickstart.sh): an experiment pipeline built on the
library — corpus, base pretraining, coprocessors and baselines, evaluation and the report. Nothing in
the library imports it."""
