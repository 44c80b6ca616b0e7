"""Evaluate Hamming retrieval on code files.

Usage:
  python -m aqhash_jax.evaluate --query-codes Q.npy --db-codes D.npy \\
      [--query-labels QL.npy --db-labels DL.npy] [--topk 100] [--radius 2] \\
      [--ranking tie-aware|ranked] [--method auto|popcount|matmul] [--json]

Code inputs are either files written by `save_codes` (packed uint32 with a `.json` sidecar, whose
stored labels are used when no label file is given) or raw [n, bits] arrays in {-1, +1} or {0, 1}.
Invalid input prints one line to stderr and exits with status 2.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags

from aqhash_jax.retrieval.export import CodeFile, check_compatible, load_codes
from aqhash_jax.retrieval.hamming import METHODS, prepare_codes
from aqhash_jax.retrieval.metrics import RANKINGS, retrieval_metrics

USAGE_ERROR = 2

_QUERY_CODES = flags.DEFINE_string("query-codes", None, "Query codes: .npy from save_codes (with sidecar) or raw [n, bits].")
_DB_CODES = flags.DEFINE_string("db-codes", None, "Database codes: .npy from save_codes (with sidecar) or raw [n, bits].")
_QUERY_LABELS = flags.DEFINE_string("query-labels", None, "Query labels .npy, int [n] or multi-hot [n, L]; default: the sidecar's.")
_DB_LABELS = flags.DEFINE_string("db-labels", None, "Database labels .npy, int [n] or multi-hot [n, L]; default: the sidecar's.")
_TOPK = flags.DEFINE_integer("topk", 100, "k for mAP@k, precision@k and recall@k (items).")
_RADIUS = flags.DEFINE_integer("radius", 2, "Hamming radius (bits) for precision within radius.")
_RANKING = flags.DEFINE_enum("ranking", "tie-aware", list(RANKINGS), "tie-aware: expected values over random tie order; ranked: stable sort, ties in database order.")
_METHOD = flags.DEFINE_enum("method", "auto", list(METHODS), "Hamming kernel; all give identical distances.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk-size", None, "Queries per device step; default sizes it from the database size.")
_JSON = flags.DEFINE_boolean("json", False, "Print one JSON object on stdout instead of a table.")


class InputError(ValueError):
    """Invalid command-line input, reported as one line with exit status 2."""


def _load_array(path: str, what: str) -> np.ndarray:
    if not os.path.exists(path):
        raise InputError(f"{what} file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {what} file {path}: {error}") from error


def load_code_input(path: str, what: str) -> CodeFile:
    """Load exported codes (detected by the sidecar) or a raw [n, bits] array as a CodeFile."""
    if os.path.exists(path + ".json"):
        return load_codes(path)
    raw = _load_array(path, what)
    if raw.dtype == np.uint32:
        raise InputError(f"{what} file {path} contains packed uint32 words but has no sidecar {path}.json; export it with save_codes")
    packed, code_length = prepare_codes(raw, None, what)
    return CodeFile(path=path, packed=packed, code_length=code_length, metadata={})


def _labels_for(codes: CodeFile, label_path: str | None, what: str) -> np.ndarray:
    if label_path is not None:
        return _load_array(label_path, f"{what} labels")
    if codes.labels is None:
        raise InputError(f"no {what} labels: pass --{what.replace('database', 'db')}-labels or export {codes.path} with labels")
    return codes.labels


def evaluate(
    query_codes: str, db_codes: str, query_labels: str | None, db_labels: str | None, *, topk: int, radius: int,
    ranking: str, method: str, chunk_size: int | None,
) -> dict:
    """Load the inputs and return `retrieval_metrics` for them."""
    query = load_code_input(query_codes, "query codes")
    db = load_code_input(db_codes, "database codes")
    check_compatible(query, db)
    return retrieval_metrics(
        query.packed, db.packed, _labels_for(query, query_labels, "query"), _labels_for(db, db_labels, "database"),
        topk=topk, radius=radius, ranking=ranking, method=method, chunk_size=chunk_size, code_length=query.code_length,
    )


def format_table(results: dict) -> str:
    """Format the metrics as an aligned two-column text table, with the PR curve below."""
    rows = [
        ("code length", f"{results['code_length']} bits"),
        ("ranking", results["ranking"]),
        ("queries", str(results["num_queries"])),
        ("database items", str(results["num_db"])),
        ("mAP@all", f"{results['map']:.4f}"),
        (f"mAP@{results['topk']}", f"{results['map_at_k']:.4f}"),
        (f"precision@{results['topk']}", f"{results['precision_at_k']:.4f}"),
        (f"recall@{results['topk']}", f"{results['recall_at_k']:.4f}"),
        (f"precision within radius {results['radius']}", f"{results['precision_within_radius']:.4f}"),
        ("queries without relevant items", str(results["num_queries_without_relevant"])),
        (f"queries with nothing within radius {results['radius']}", str(results["num_queries_empty_radius"])),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append("radius  precision  recall")
    curve = results["pr_curve"]
    for radius, precision, recall in zip(curve["radius"], curve["precision"], curve["recall"]):
        lines.append(f"{radius:>6}  {precision:>9.4f}  {recall:>6.4f}")
    return "\n".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; all inputs are flags (see --help)", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    for flag in (_QUERY_CODES, _DB_CODES):
        if flag.value is None:
            print(f"error: --{flag.name} is required", file=sys.stderr)
            sys.exit(USAGE_ERROR)
    try:
        results = evaluate(
            _QUERY_CODES.value, _DB_CODES.value, _QUERY_LABELS.value, _DB_LABELS.value, topk=_TOPK.value,
            radius=_RADIUS.value, ranking=_RANKING.value, method=_METHOD.value, chunk_size=_CHUNK_SIZE.value,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR)

    if _JSON.value:
        print(json.dumps(results))
    else:
        print(format_table(results))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
