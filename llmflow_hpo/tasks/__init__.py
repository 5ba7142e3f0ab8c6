"""Stage 3, tasks: one module per task behind the small contract of ``tasks.base``, and the registry.

Outside this folder no code asks which task it runs: it asks the task object.
"""
