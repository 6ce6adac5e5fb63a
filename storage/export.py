"""Export a PanelForge dataset to Parquet that any tool reads: duckdb, Spark, pandas, polars, datasets.

    panelforge datasets export out/tiny/panels --format parquet out/tiny/panels-parquet
    python -m storage.export out/tiny/panels out/tiny/panels-parquet      # the same, without the CLI
    duckdb -c "SELECT task, count(*) FROM 'out/tiny/panels-parquet/data/*.parquet' GROUP BY task"

Layout of OUT (a local folder or an object-store prefix):
    data/<unit>.parquet     the rows, one file per shard of the source (same order, same unit names)
    rejects.parquet         the rejects table (input_ref, stage, reason, detail)
    manifest.json           the source's manifest (kind, schema version, lineage, layout fingerprint)

The files are zstd-compressed, with row groups of about `row_group_mb` MiB of uncompressed data
(64 by default: what duckdb and Spark split work on; a reader that wants smaller random-access
groups re-exports with a smaller value). Image columns (upper, lower) take the Hugging Face `Image`
layout, a struct {bytes, path}, which costs nothing: the encoded bytes are the same buffers, and
`datasets.load_dataset("parquet", data_dir=OUT + "/data")` shows them as images. Each file's schema
metadata carries the kind, schema version and layout fingerprint as `panelforge.*` keys.
Uses pyarrow only.
"""
from __future__ import annotations

import json
import sys
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.dataset import open_dataset
from storage.errors import StorageError
from storage.schemas import SCHEMA_VERSION
from storage.uri import resolve

IMAGE_COLUMNS = ("upper", "lower")  # encoded image bytes in panels and generated datasets
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FORMATS = ("parquet",)


def as_hf_image(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """binary -> struct {bytes, path: null}; a null image stays a null struct. No bytes are copied."""
    chunks = []
    for chunk in column.chunks:
        paths = pa.nulls(len(chunk), pa.string())
        mask = chunk.is_null() if chunk.null_count else None
        chunks.append(pa.StructArray.from_arrays([chunk, paths], fields=list(IMAGE_TYPE), mask=mask))
    return pa.chunked_array(chunks, type=IMAGE_TYPE)


def _hf_feature(t: pa.DataType) -> dict:
    """The `datasets` feature of an Arrow type (for the `huggingface` schema metadata)."""
    if t == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "Sequence"}
    names = {pa.string(): "string", pa.binary(): "binary", pa.int32(): "int32", pa.int64(): "int64",
             pa.float32(): "float32", pa.float64(): "float64", pa.bool_(): "bool"}
    return {"dtype": names.get(t, str(t)), "_type": "Value"}


def export_schema(table: pa.Table, manifest: dict) -> pa.Table:
    """The table with its image columns in the Image layout and the schema metadata set."""
    for name in IMAGE_COLUMNS:
        if name in table.column_names and pa.types.is_binary(table.schema.field(name).type):
            table = table.set_column(table.column_names.index(name), pa.field(name, IMAGE_TYPE),
                                     as_hf_image(table.column(name)))
    meta = manifest.get("meta") or {}
    fingerprint = meta.get("fingerprint") or meta.get("layout_fingerprint") or ""
    features = {f.name: _hf_feature(f.type) for f in table.schema}
    return table.replace_schema_metadata({
        "panelforge.kind": manifest["kind"],
        "panelforge.schema_version": str(manifest.get("schema_version", SCHEMA_VERSION)),
        "panelforge.fingerprint": str(fingerprint),
        "huggingface": json.dumps({"info": {"features": features}}),
    })


def rows_per_group(table: pa.Table, row_group_mb: float) -> int:
    """Rows of about row_group_mb MiB of uncompressed data (at least 1)."""
    if table.num_rows == 0:
        return 1
    per_row = max(1, table.nbytes // table.num_rows)
    return max(1, min(table.num_rows, int(row_group_mb * 2**20 // per_row)))


def _write(fs, path: str, table: pa.Table, row_group_mb: float) -> None:
    """Write under a temporary name, then rename: a crash leaves no partial file under the real name."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as sink:
        pq.write_table(table, sink, compression="zstd", row_group_size=rows_per_group(table, row_group_mb))
    fs.move(tmp, path)


def _is_export(loc) -> bool:
    try:
        with loc.fs.open_input_stream(loc.join("manifest.json")) as f:
            return "exported_from" in json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return False


def export_dataset(src: str, out: str, fmt: str = "parquet", row_group_mb: float = 64,
                   verify: bool = True) -> dict:
    """Export dataset `src` to `out`; returns {out, files, rows, rejects, bytes}. With verify (the
    default) every shard's sha256 is checked first, so a corrupt shard is never exported."""
    if fmt not in FORMATS:
        raise StorageError(f"export format {fmt!r}: expected one of {FORMATS}")
    if row_group_mb <= 0:
        raise StorageError(f"row_group_mb {row_group_mb}: must be > 0")
    ds = open_dataset(src, verify=verify)
    loc = resolve(out)
    if loc.uri.rstrip("/") == ds.uri.rstrip("/"):
        raise StorageError(f"{out}: the export must go to another folder than its dataset")
    busy = loc.fs.get_file_info(loc.path).type.name == "Directory" and loc.fs.get_file_info(pafs.FileSelector(loc.path))
    if busy and not _is_export(loc):  # never write over someone's folder, or over a dataset
        raise StorageError(f"{loc.uri}: exists and is not a PanelForge export; choose an empty or new folder")
    loc.fs.create_dir(loc.join("data"), recursive=True)
    files, rows, written = [], 0, 0
    for i, entry in enumerate(ds.shards):
        name = entry["file"].rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".parquet"
        table = export_schema(ds.shard_table(i), ds.manifest)
        _write(loc.fs, loc.join("data", name), table, row_group_mb)
        files.append(f"data/{name}")
        rows += table.num_rows
        written += loc.fs.get_file_info(loc.join("data", name)).size
    # Files of an earlier export of another version of the dataset would read as extra rows.
    keep = {f.rsplit("/", 1)[-1] for f in files}
    for stale in loc.fs.get_file_info(pafs.FileSelector(loc.join("data"))):
        if stale.base_name not in keep:
            loc.fs.delete_file(stale.path)
    rejects = ds.rejects().replace_schema_metadata({"panelforge.kind": "rejects",
                                                    "panelforge.schema_version": str(SCHEMA_VERSION)})
    _write(loc.fs, loc.join("rejects.parquet"), rejects, row_group_mb)
    with loc.fs.open_output_stream(loc.join("manifest.json")) as f:
        f.write(json.dumps(dict(ds.manifest, exported_from=ds.uri), indent=2, default=str).encode())
    return {"out": loc.uri, "format": fmt, "files": len(files), "rows": rows, "rejects": rejects.num_rows,
            "bytes": written}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("out")
    ap.add_argument("--row-group-mb", type=float, default=64)
    args = ap.parse_args(argv)
    print(json.dumps(export_dataset(args.dataset, args.out, row_group_mb=args.row_group_mb), indent=2))


if __name__ == "__main__":
    sys.exit(main())
