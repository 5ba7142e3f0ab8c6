"""Stage 2, data: read the files (``read``), clean and split them, then tokenize and align labels (``features``).

The task module (``tasks/``) says which formats and fields a task reads and how its labels align to tokens.
"""
