"""Stage 4, the recipe: build the model, train it, evaluate it at the evaluation points, checkpoint the loop.

Read ``train`` top to bottom (set-up, the training step, the loop, the evaluation point, and its two entry
points ``train_and_evaluate`` for a search trial and ``retrain`` for retrain-best). Its building blocks:
``runtime`` (device and precision), ``batches`` (the loaders), ``optim`` (optimizer and schedule), ``loss``,
``evaluation``; ``checkpoints`` saves and restores the loop state; ``models`` builds the model; ``results``
holds what a run hands back, without torch.
"""
