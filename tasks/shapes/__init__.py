"""The synthetic shapes world: scenes with their truth, and the detector that finds shapes in a picture."""
