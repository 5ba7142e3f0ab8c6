"""Stage 4, the recipe: build the model, train it, evaluate it at the evaluation points, checkpoint the loop.

Read ``train`` top to bottom; ``checkpoints`` saves and restores the loop state; ``models`` builds the model.
"""
