"""Recipes end to end: the main demo (stages 1-3 and its learning table), the long-document
step and stage 4, each built from `train/` and `evaluation/`."""
