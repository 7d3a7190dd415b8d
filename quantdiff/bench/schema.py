"""The bench.json schema (quantdiff/data/bench.schema.json, documented in docs/BENCH_SCHEMA.md)."""
import functools
import json
from pathlib import Path

import jsonschema

from ..errors import ConfigError
from ..io import read_json

BENCH_SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "bench.schema.json"
BENCH_SCHEMA_VERSION = 1
MAX_ERRORS_SHOWN = 10


class BenchSchemaError(ConfigError, ValueError):
    """A bench record breaks the schema. Both a ConfigError and a ValueError, so either catch works."""


@functools.cache
def _validator():
    schema = json.loads(BENCH_SCHEMA_PATH.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _json_path(parts):
    """'$.quality.psnr_db[2]' from jsonschema's path deque."""
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def validate_bench(record: dict) -> None:
    """Raise BenchSchemaError naming each failing JSON path (and the key, for a missing one)."""
    errors = sorted(_validator().iter_errors(record), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if not errors:
        return
    lines = [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors[:MAX_ERRORS_SHOWN]]
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more")
    raise BenchSchemaError(
        f"bench record does not match {BENCH_SCHEMA_PATH.name} (schema_version {BENCH_SCHEMA_VERSION}; "
        "see docs/BENCH_SCHEMA.md):\n  " + "\n  ".join(lines)
    )


def load_bench(path, validate: bool = True) -> dict:
    """Read a bench.json; CorruptArtifactError if it is not JSON, BenchSchemaError if it breaks the schema."""
    record = read_json(path)
    if validate:
        try:
            validate_bench(record)
        except BenchSchemaError as err:
            raise BenchSchemaError(f"{path}: {err}") from err
    return record
