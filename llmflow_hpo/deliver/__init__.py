"""Stage 7, deliver: retrain the best trial from the storage alone (``retrain``) and write the model folder
(``export``).
"""
