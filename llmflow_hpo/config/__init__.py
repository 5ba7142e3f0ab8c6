"""Stage 1, config: the study YAML and the search-space file read into typed objects, checked once at the edge.

``study`` holds the dataclasses and their checks; ``hyperparameters`` declares every knob of the recipe once.
Nothing here imports torch.
"""
