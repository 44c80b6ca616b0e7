"""Search a code file by Hamming distance, exactly or through a faiss index.

    python -m aqhash_jax.search --codes CODES.npy --query IMG [IMG ...] --workdir DIR \\
        [--topk 10] [--radius R] [--sheet OUT.png] [--json]
    python -m aqhash_jax.search --codes CODES.npy --query-codes Q.npy [--query-rows 0,5,7] ...
    python -m aqhash_jax.search --codes CODES.npy ... --index OUT.faiss [--nprobe N] [--ef-search N]
    python -m aqhash_jax.search build-index --codes CODES.npy --index OUT.faiss --type flat|hnsw|ivf

Queries are images, encoded with the trained model of `--workdir` (whose fingerprint must match
the code file's), or rows of a code file (`--query-codes`, a `save_codes` file or a raw [n, bits]
array in {-1, +1} or {0, 1}; `--query-rows` picks rows, default all). Query and database code
lengths must be equal.

Ranking and ties. Results are ordered by Hamming distance, and items at equal distance by
database row (lower first), so the output does not depend on hardware. Each result shows its
rank. Items tied with other database items at the same distance share a rank range, for example
"3-5", and their distance carries a "=" marker. With the exact scan the range counts every
database item at that distance, including tied items cut off by `--topk`, whose number is printed
below the list. With `--index` the ranks are positions in the list the index returned, and a
range that reaches the end of a full list ends in "+" because the index does not report further
ties.

`--topk 0` returns every item within `--radius`. `--radius R` keeps results at distance <= R.
Invalid input prints one line starting with "error:" to stderr and exits with status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Sequence

import numpy as np
from absl import app, logging
from absl.flags import argparse_flags

from aqhash_jax import faiss_index
from aqhash_jax.retrieval.export import CodeFile, check_compatible, load_codes
from aqhash_jax.retrieval.hamming import distance_histograms, hamming_topk, prepare_codes

USAGE_ERROR = 2


class SearchError(ValueError):
    """Invalid search input, reported as one line with exit status 2."""


@dataclasses.dataclass
class QuerySet:
    """Packed query codes with a display name and an optional image path per query."""

    packed: np.ndarray
    code_length: int
    names: list[str]
    paths: list[str | None]
    fingerprint: str | None = None
    path: str = "<queries>"

    def as_code_file(self) -> CodeFile:
        return CodeFile(
            path=self.path, packed=self.packed, code_length=self.code_length,
            metadata={"fingerprint": self.fingerprint} if self.fingerprint else {},
        )


@dataclasses.dataclass
class Neighbour:
    """One result: `rank_first`..`rank_last` is its tie group (equal when it has no ties)."""

    rank_first: int
    rank_last: int
    distance: int
    index: int
    id: object
    path: str | None
    # True when the tie group may continue past the returned list (index search only).
    open_end: bool = False

    @property
    def tied(self) -> bool:
        return self.rank_last > self.rank_first or self.open_end

    def rank_label(self) -> str:
        if not self.tied:
            return str(self.rank_first)
        if self.rank_first == self.rank_last:
            return f"{self.rank_first}+"
        return f"{self.rank_first}-{self.rank_last}{'+' if self.open_end else ''}"


@dataclasses.dataclass
class QueryResult:
    """The results of one query.

    Attributes:
      name: query display name (image path or "codes.npy[row]").
      path: query image path, or None when unknown.
      neighbours: results nearest first.
      ranks_exact: True when ranks count the whole database (exact scan).
      tied_not_shown: database items tied with the last shown group but cut off by --topk (exact
        scan only, else 0).
    """

    name: str
    path: str | None
    neighbours: list[Neighbour]
    ranks_exact: bool
    tied_not_shown: int = 0


def load_code_input(path: str, description: str) -> CodeFile:
    """Load a `save_codes` file (detected by its sidecar) or a raw [n, bits] array as a CodeFile."""
    if os.path.exists(path + ".json"):
        return load_codes(path)
    if not os.path.exists(path):
        raise SearchError(f"{description} file {path} not found.")
    try:
        raw = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SearchError(f"cannot read {description} file {path}: {error}") from error
    if raw.dtype == np.uint32:
        raise SearchError(
            f"{description} file {path} contains packed uint32 words but has no sidecar {path}.json; write it with save_codes."
        )
    packed, code_length = prepare_codes(raw, None, description)
    return CodeFile(path=path, packed=packed, code_length=code_length, metadata={})


def parse_rows(text: str | None, num_rows: int, source: str) -> list[int]:
    """Parse "0,5,7" into row numbers in [0, num_rows); None selects every row."""
    if text is None:
        return list(range(num_rows))
    rows = []
    for token in text.split(","):
        token = token.strip()
        try:
            row = int(token)
        except ValueError:
            raise SearchError(f"--query-rows entry {token!r} is not an integer; pass comma-separated row numbers such as 0,5,7.") from None
        if not 0 <= row < num_rows:
            raise SearchError(f"--query-rows entry {row} is outside {source}, which has rows 0..{num_rows - 1}.")
        rows.append(row)
    if not rows:
        raise SearchError("--query-rows is empty; pass comma-separated row numbers such as 0,5,7.")
    return rows


def queries_from_code_file(path: str, rows_text: str | None) -> QuerySet:
    """Select query rows of a code file; names are the stored image paths or "path[row]"."""
    codes = load_code_input(path, "query codes")
    rows = parse_rows(rows_text, codes.num_rows, path)
    stored_paths = codes.paths
    paths = [stored_paths[row] if stored_paths else None for row in rows]
    names = [paths[i] or f"{path}[{row}]" for i, row in enumerate(rows)]
    return QuerySet(
        packed=codes.packed[rows], code_length=codes.code_length, names=names, paths=paths,
        fingerprint=codes.fingerprint, path=path,
    )


def queries_from_images(workdir: str, image_paths: Sequence[str], *, batch_size: int, database: CodeFile) -> QuerySet:
    """Encode query images with the model of `workdir`, which must be the model of the database codes."""
    from aqhash_jax import encode as encode_lib
    from aqhash_jax.retrieval.codes import pack_codes, sign_codes

    for image_path in image_paths:
        if not os.path.isfile(image_path):
            raise SearchError(f"query image {image_path} not found.")
    encoder = encode_lib.load_encoder(workdir)
    if encoder.code_length != database.code_length:
        raise SearchError(
            f"the model in {workdir} writes {encoder.code_length}-bit codes but {database.path} contains "
            f"{database.code_length}-bit codes; pass the --workdir of the model that encoded {database.path}."
        )
    if database.fingerprint and database.fingerprint != encoder.fingerprint:
        raise SearchError(
            f"{database.path} was encoded by a model with fingerprint {database.fingerprint[:12]}, but the model in "
            f"{workdir} has fingerprint {encoder.fingerprint[:12]}; pass the --workdir of the model that encoded it."
        )
    result = encode_lib.encode_images(encoder, list(image_paths), batch_size=batch_size, progress=False)
    if result.failed:
        reasons = "; ".join(f"{item.path}: {item.reason}" for item in result.failed)
        raise SearchError(f"cannot decode query images ({reasons}).")
    by_path = dict(zip(result.paths, pack_codes(sign_codes(result.codes))))
    packed = np.stack([by_path[os.fspath(p)] for p in image_paths]).astype(np.uint32)
    return QuerySet(
        packed=packed, code_length=encoder.code_length, names=[os.fspath(p) for p in image_paths],
        paths=[os.path.abspath(p) for p in image_paths], fingerprint=encoder.fingerprint, path="<query images>",
    )


def concatenate_queries(parts: Sequence[QuerySet]) -> QuerySet:
    """Join query sets of the same code length, in order."""
    lengths = {part.code_length for part in parts}
    if len(lengths) > 1:
        raise SearchError(f"query sets have different code lengths {sorted(lengths)}; use one model for all queries.")
    if len(parts) == 1:
        return parts[0]
    fingerprints = {part.fingerprint for part in parts}
    return QuerySet(
        packed=np.concatenate([part.packed for part in parts]), code_length=parts[0].code_length,
        names=[name for part in parts for name in part.names], paths=[path for part in parts for path in part.paths],
        fingerprint=fingerprints.pop() if len(fingerprints) == 1 else None,
        path=" + ".join(part.path for part in parts),
    )


def _check_limits(topk: int, radius: int | None, code_length: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 0:
        raise SearchError(f"--topk must be a non-negative integer, got {topk!r}.")
    if topk == 0 and radius is None:
        raise SearchError("--topk 0 returns everything within --radius, so pass --radius as well.")
    if radius is not None and not 0 <= radius <= code_length:
        raise SearchError(f"--radius must be in [0, {code_length}] for {code_length}-bit codes, got {radius}.")


def _neighbour(db: CodeFile, rank_first: int, rank_last: int, distance: int, index: int, open_end: bool = False) -> Neighbour:
    ids, paths = db.ids, db.paths
    return Neighbour(
        rank_first=int(rank_first), rank_last=int(rank_last), distance=int(distance), index=int(index),
        id=ids[index] if ids is not None else int(index), path=paths[index] if paths is not None else None,
        open_end=open_end,
    )


def search_exact(queries: QuerySet, db: CodeFile, *, topk: int, radius: int | None) -> list[QueryResult]:
    """Rank the database for each query with the exact Hamming kernel.

    A distance histogram over the whole database gives each tie group its true rank range.
    """
    check_compatible(queries.as_code_file(), db)
    _check_limits(topk, radius, db.code_length)
    num_queries = queries.packed.shape[0]
    zeros_query = np.zeros(num_queries, dtype=np.int32)
    zeros_db = np.zeros(db.num_rows, dtype=np.int32)
    counts, _ = distance_histograms(queries.packed, db.packed, db.code_length, zeros_query, zeros_db)
    closer = np.concatenate([np.zeros((num_queries, 1), np.int64), np.cumsum(counts, axis=1)], axis=1)

    if topk == 0:
        # Every item within the radius: as many as the largest cumulative count at the radius.
        k = int(max(1, closer[:, radius + 1].max()))
    else:
        k = topk
    distances, indices = hamming_topk(queries.packed, db.packed, db.code_length, k)

    results = []
    for row in range(num_queries):
        neighbours = []
        for distance, index in zip(distances[row], indices[row]):
            if radius is not None and distance > radius:
                break
            neighbours.append(_neighbour(db, closer[row, distance] + 1, closer[row, distance + 1], distance, index))
        tied_not_shown = 0
        if neighbours:
            last = neighbours[-1]
            tied_not_shown = last.rank_last - (last.rank_first - 1) - sum(n.distance == last.distance for n in neighbours)
        results.append(QueryResult(queries.names[row], queries.paths[row], neighbours, True, tied_not_shown))
    return results


def search_with_index(
    queries: QuerySet, db: CodeFile, index, *, topk: int, radius: int | None, nprobe: int | None, ef_search: int | None
) -> list[QueryResult]:
    """Rank the database for each query through a faiss index; ranks are positions in its list."""
    check_compatible(queries.as_code_file(), db)
    _check_limits(topk, radius, db.code_length)
    if topk == 0:
        raise SearchError("--topk 0 (everything within --radius) needs the exact scan; drop --index or pass --topk.")
    distances, indices = faiss_index.search_index(
        index, queries.packed, db.code_length, topk, nprobe=nprobe, ef_search=ef_search
    )
    full_list = distances.shape[1] == topk
    results = []
    for row in range(distances.shape[0]):
        keep = indices[row] >= 0
        if radius is not None:
            keep &= distances[row] <= radius
        row_distances, row_indices = distances[row][keep], indices[row][keep]
        neighbours = []
        for position, (distance, index_value) in enumerate(zip(row_distances, row_indices)):
            group = np.flatnonzero(row_distances == distance)
            # Within radius the group is complete when farther results were returned after it.
            at_end = group[-1] == len(row_distances) - 1
            open_end = bool(at_end and full_list and bool(keep.all()))
            neighbours.append(_neighbour(db, group[0] + 1, group[-1] + 1, distance, index_value, open_end))
        results.append(QueryResult(queries.names[row], queries.paths[row], neighbours, False, 0))
    return results


def format_results(results: Sequence[QueryResult], *, code_length: int, num_db: int, method: str) -> str:
    """Format results as text: one block per query with rank, distance ("=" marks ties), row, id and path."""
    lines = []
    for number, result in enumerate(results, start=1):
        lines.append(
            f"query {number}/{len(results)}: {result.name}  ({len(result.neighbours)} results from {num_db} "
            f"database codes, {code_length} bits, {method})"
        )
        if not result.neighbours:
            lines.append("  no results")
        else:
            lines.append(f"  {'rank':>11}  {'distance':>9}  {'row':>8}  {'id':>8}  path")
        for neighbour in result.neighbours:
            marker = "=" if neighbour.tied else " "
            lines.append(
                f"  {neighbour.rank_label():>11}  {neighbour.distance:>7} {marker}  {neighbour.index:>8}  "
                f"{str(neighbour.id):>8}  {neighbour.path or '-'}"
            )
        if result.tied_not_shown:
            last = result.neighbours[-1]
            lines.append(f"  ({result.tied_not_shown} more database items at distance {last.distance} not shown)")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def results_to_json(results: Sequence[QueryResult], *, code_length: int, num_db: int, method: str,
                    topk: int, radius: int | None) -> dict:
    """Return the results as a JSON-ready dict."""
    return {
        "code_length": code_length,
        "num_db": num_db,
        "method": method,
        "topk": topk,
        "radius": radius,
        "tie_order": "database row, ascending",
        "queries": [
            {
                "query": result.name,
                "path": result.path,
                "ranks_exact": result.ranks_exact,
                "tied_not_shown": result.tied_not_shown,
                "results": [
                    {
                        "rank_first": n.rank_first, "rank_last": n.rank_last, "rank_open_end": n.open_end,
                        "tied": n.tied, "distance": n.distance, "row": n.index, "id": n.id, "path": n.path,
                    }
                    for n in result.neighbours
                ],
            }
            for result in results
        ],
    }


def draw_sheet(results: Sequence[QueryResult], out_path: str, *, thumb_size: int = 128):
    """Draw a contact sheet of each query and its results, captioned with rank and distance."""
    from aqhash_jax import sheet

    rows = []
    for result in results:
        tiles = [
            sheet.Tile(n.path, [f"#{n.rank_label()}  d={n.distance}{' =' if n.tied else ''}", os.path.basename(n.path or f"row {n.index}")])
            for n in result.neighbours
        ]
        rows.append(sheet.SheetRow(sheet.Tile(result.path, ["query", os.path.basename(result.name)]), tiles))
    return sheet.draw_contact_sheet(rows, out_path, thumb_size=thumb_size)


def build_index_command(codes_path: str, index_path: str, index_type: str, *, hnsw_m: int, ef_construction: int,
                        nlist: int | None, nprobe: int, ef_search: int, seed: int = 0) -> dict:
    """Build a faiss index over a code file and save it with its sidecar; return the sidecar."""
    db = load_codes(codes_path)
    index = faiss_index.build_index(
        db.packed, db.code_length, index_type, hnsw_m=hnsw_m, ef_construction=ef_construction, nlist=nlist, seed=seed
    )
    params = {"seed": seed}
    if index_type == "hnsw":
        params.update(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search)
        index.hnsw.efSearch = ef_search
    elif index_type == "ivf":
        params.update(nlist=int(index.nlist), nprobe=nprobe)
        index.nprobe = nprobe
    faiss_index.save_index(
        index, index_path, code_length=db.code_length, codes_sha256=faiss_index.codes_digest(db.packed),
        codes_path=codes_path, fingerprint=db.fingerprint, params=params,
    )
    with open(index_path + ".json", encoding="utf-8") as handle:
        return json.load(handle)


def run_search(args) -> tuple[list[QueryResult], CodeFile, str]:
    """Load the database and queries named by the parsed arguments and search; return (results, db, method)."""
    db = load_code_input(args.codes, "database codes")
    parts = []
    if args.query:
        if not args.workdir:
            raise SearchError("image queries (--query) are encoded by a trained model, so pass --workdir as well.")
        parts.append(queries_from_images(args.workdir, args.query, batch_size=args.batch_size, database=db))
    if args.query_codes:
        parts.append(queries_from_code_file(args.query_codes, args.query_rows))
    elif args.query_rows is not None:
        raise SearchError("--query-rows selects rows of --query-codes; pass --query-codes as well.")
    if not parts:
        raise SearchError("no queries given; pass --query IMAGE... (with --workdir) or --query-codes FILE.")
    queries = concatenate_queries(parts)
    if queries.code_length != db.code_length:
        raise SearchError(
            f"query codes have code length {queries.code_length} but database codes {db.path} have "
            f"{db.code_length}; encode both with the same model."
        )

    if args.index:
        index, metadata = faiss_index.load_index(args.index)
        faiss_index.check_index_matches(metadata, db.packed, db.code_length, db.path)
        stored = metadata.get("params", {})
        nprobe = args.nprobe if args.nprobe is not None else stored.get("nprobe")
        ef_search = args.ef_search if args.ef_search is not None else stored.get("ef_search")
        results = search_with_index(
            queries, db, index, topk=args.topk, radius=args.radius, nprobe=nprobe, ef_search=ef_search
        )
        method = f"faiss {metadata['index_type']} index"
    else:
        results = search_exact(queries, db, topk=args.topk, radius=args.radius)
        method = "exact scan"
    return results, db, method


def _search_parser() -> argparse_flags.ArgumentParser:
    parser = argparse_flags.ArgumentParser(
        prog="python -m aqhash_jax.search",
        description="Rank a code file by Hamming distance for query images or query codes "
        "(or run `python -m aqhash_jax.search build-index --help`).",
    )
    parser.add_argument("--codes", required=True, help="database code file (.npy with sidecar, e.g. from aqhash_jax.encode)")
    parser.add_argument("--query", nargs="+", metavar="IMG", help="query image files, encoded with the model of --workdir")
    parser.add_argument("--workdir", help="training workdir (or export folder) of the model that encoded --codes")
    parser.add_argument("--query-codes", help="code file whose rows are queries (.npy with sidecar, or raw [n, bits])")
    parser.add_argument("--query-rows", help="comma-separated rows of --query-codes, e.g. 0,5,7 (default: all)")
    parser.add_argument("--topk", type=int, default=10, help="results per query; 0 returns all within --radius (default %(default)s)")
    parser.add_argument("--radius", type=int, default=None, help="keep results at Hamming distance <= R bits")
    parser.add_argument("--index", help="faiss index from build-index; default: exact scan")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF index: lists to visit (default: the value stored at build time)")
    parser.add_argument("--ef-search", type=int, default=None, help="HNSW index: candidate list size (default: the value stored at build time)")
    parser.add_argument("--sheet", help="write a contact sheet image (.png or .jpg) of each query and its results")
    parser.add_argument("--thumb-size", type=int, default=128, help="contact sheet tile side in pixels (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step when encoding query images (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(command="search")
    return parser


def _build_index_parser() -> argparse_flags.ArgumentParser:
    parser = argparse_flags.ArgumentParser(
        prog="python -m aqhash_jax.search build-index",
        description="Build a faiss binary index over a code file for approximate search of large galleries.",
    )
    parser.add_argument("--codes", required=True, help="database code file (.npy with sidecar)")
    parser.add_argument("--index", required=True, help="index file to write; a JSON sidecar goes next to it")
    parser.add_argument("--type", choices=faiss_index.INDEX_TYPES, default="flat", help="flat (exact), hnsw (graph) or ivf (inverted lists); default %(default)s")
    parser.add_argument("--hnsw-m", type=int, default=faiss_index.DEFAULT_HNSW_M, help="HNSW neighbours per node (default %(default)s)")
    parser.add_argument("--ef-construction", type=int, default=faiss_index.DEFAULT_EF_CONSTRUCTION, help="HNSW build candidate list size (default %(default)s)")
    parser.add_argument("--ef-search", type=int, default=faiss_index.DEFAULT_EF_SEARCH, help="HNSW search candidate list size stored as default (default %(default)s)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about sqrt(rows))")
    parser.add_argument("--nprobe", type=int, default=faiss_index.DEFAULT_NPROBE, help="IVF lists visited per query, stored as default (default %(default)s)")
    parser.set_defaults(command="build-index")
    return parser


def _parse_flags(argv: list[str]):
    if len(argv) > 1 and argv[1] == "build-index":
        return _build_index_parser().parse_args(argv[2:])
    return _search_parser().parse_args(argv[1:])


def main(args) -> None:
    try:
        if args.command == "build-index":
            sidecar = build_index_command(
                args.codes, args.index, args.type, hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                nlist=args.nlist, nprobe=args.nprobe, ef_search=args.ef_search,
            )
            print(f"{args.index}: faiss {sidecar['index_type']} index over {sidecar['num_rows']} codes of {sidecar['code_length']} bits")
            return
        results, db, method = run_search(args)
        if args.sheet:
            draw_sheet(results, args.sheet, thumb_size=args.thumb_size)
            logging.info("Wrote contact sheet %s.", args.sheet)
    except (ValueError, FileNotFoundError, faiss_index.FaissMissingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USAGE_ERROR)

    if args.json:
        print(json.dumps(results_to_json(results, code_length=db.code_length, num_db=db.num_rows, method=method,
                                         topk=args.topk, radius=args.radius)))
    else:
        print(format_results(results, code_length=db.code_length, num_db=db.num_rows, method=method))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
