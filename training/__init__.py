"""How the default model is trained: the recipe (recipe.py, DeepSpeed) and its corpus (corpus.py)."""
