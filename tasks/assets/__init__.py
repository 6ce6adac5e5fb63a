"""The recipes that train the shipped tiny models on the shapes world (docs/assets.md)."""
