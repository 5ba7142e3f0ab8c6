"""Stage 2, data: read the files (``read``; Parquet, Arrow, JSON and save_to_disk folders in ``tables``), clean
them (``clean``), apply the label rules (``labels``), make and check the splits (``splits``; the first lines of
every file in ``check``), then tokenize and align labels (``features``).

The task module (``tasks/``) says which formats and fields a task reads and how its labels align to tokens.
"""
