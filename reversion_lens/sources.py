"""Reading prompts and fine-tuning examples: text, JSON, JSONL, CSV files and Hugging Face data sets.

Sources (:func:`read_prompts`, :func:`read_examples`):

* ``prompts.txt``: one prompt per line (blank lines skipped);
* ``data.jsonl``: one JSON object per line with a ``prompt`` field (and ``response`` for fine-tuning);
* ``data.json``: a list of such objects, or a list of strings (prompts only);
* ``data.csv`` / ``data.tsv``: a header row naming the columns, one record per row (UTF-8, a BOM is
  allowed); HarmBench's behaviour files hold the request in ``Behavior``;
* ``hf:OWNER/NAME[@SPLIT]``: a Hugging Face ``datasets`` data set (hub access or the local cache;
  ``datasets`` is imported only then).

Field (column) names are arguments (``prompt_field="Behavior"``). ``where`` keeps the records whose fields
equal given values, before ``limit``: ``where={"FunctionalCategory": "standard"}`` (a list of values
means any of them), or the ``FIELD=VALUE`` strings a command line or TOML file passes
(``where=["FunctionalCategory=standard"]``; a repeated field means any of its values; see
:func:`parse_where`). Non-string JSON values compare as their JSON text (``1``, ``true``).
HarmBench's 159 self-contained requests::

    read_prompts(".../harmbench_behaviors_text_test.csv", prompt_field="Behavior",
                 where="FunctionalCategory=standard")
"""

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ProbeError, SpecError

__all__ = ["Example", "parse_where", "read_prompts", "read_examples"]

Where = Mapping[str, str | Sequence[str]] | str | Sequence[str] | None


@dataclass(frozen=True)
class Example:
    """One fine-tuning example: a prompt and the response the model should learn."""

    prompt: str
    response: str


def _records(source: str | os.PathLike, split: str, config: str | None) -> tuple[list[Any], str]:
    """Raw records (strings or dicts) and a label for messages."""
    raw = os.fspath(source)
    if raw.startswith("hf:"):
        return _hf_records(raw[3:], split, config), raw
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SpecError(
            f"{raw}: no such file. Give a .txt (one prompt per line), .jsonl, .json or .csv file, or a Hugging "
            "Face data set as hf:OWNER/NAME[@SPLIT]."
        )
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
        try:
            rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
        except csv.Error as e:
            raise ProbeError(f"{path} line {reader.line_num} is not valid CSV ({e}).") from e
        if reader.fieldnames is None:
            raise ProbeError(f"{path} is empty; a CSV file needs a header row naming its columns.")
        return rows, str(path)
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ProbeError(f"{path} line {i} is not valid JSON ({e}); each line must be one JSON object.") from e
        return out, str(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{path} is not valid JSON ({e}).") from e
        if not isinstance(data, list):
            raise ProbeError(f"{path} must hold a JSON list of strings or objects, not a {type(data).__name__}.")
        return data, str(path)
    return [line.rstrip("\r") for line in text.splitlines() if line.strip()], str(path)


def _hf_records(name: str, split: str, config: str | None) -> list[Any]:
    name, _, at_split = name.partition("@")
    split = at_split or split
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is optional
        raise SpecError(f"hf:{name} needs the `datasets` package: pip install datasets.") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as e:
        flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        offline = any(os.environ.get(v, "").upper() in ("1", "TRUE", "YES", "ON") for v in flags)
        raise SpecError(
            f"could not load the Hugging Face data set {name!r} (split {split!r}"
            + (f", config {config!r}" if config else "")
            + f"): {e}. "
            + (
                "Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), so only cached data sets load. "
                if offline
                else ""
            )
            + "Check the name and split, run once with hub access, or export the prompts to a .jsonl file."
        ) from e
    return list(ds)


def parse_where(where: Where) -> dict[str, tuple[str, ...]]:
    """``where`` as ``{field: allowed values}``.

    Args:
        where: ``None``; a mapping ``field -> value`` or ``field -> [values]``; a ``"FIELD=VALUE"`` string
            or a list of them (split at the first ``=``; a repeated field allows each of its values).

    Returns:
        ``{field: (value, ...)}``; a record matches when each field's value is one of its values.
    """
    if where is None:
        return {}
    out: dict[str, list[str]] = {}
    if isinstance(where, Mapping):
        for k, v in where.items():
            out[str(k)] = [v] if isinstance(v, str) else [str(x) for x in v]
    else:
        for item in [where] if isinstance(where, str) else where:
            field, sep, value = str(item).partition("=")
            if not sep or not field.strip():
                raise ProbeError(f"where condition {item!r} is not FIELD=VALUE, e.g. FunctionalCategory=standard.")
            out.setdefault(field.strip(), []).append(value)
    if any(not v for v in out.values()):
        raise ProbeError(f"where {dict(out)} gives a field no values; give at least one value per field.")
    return {k: tuple(v) for k, v in out.items()}


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _fields(records: Sequence[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        if isinstance(r, dict):
            seen.update(dict.fromkeys(r))
    return list(seen)


def _require(records: Sequence[Any], field: str, label: str, arg: str) -> None:
    """At least one record has ``field`` (else name the fields, or a CSV file's columns, there are)."""
    if not records or any(isinstance(r, dict) and field in r for r in records):
        return
    if all(isinstance(r, str) for r in records):
        raise ProbeError(f"{label} holds plain lines, which have no {field!r} field; drop {arg}= or use JSONL or CSV.")
    keys = _fields(records)
    noun = "column" if label.endswith((".csv", ".tsv")) else "field"
    fix = (
        f"filter on one of them, e.g. where='{keys[0]}=VALUE'"
        if arg == "where" and keys
        else f"pass the {noun} name, e.g. {arg}={keys[0] if keys else 'goal'!r}"
    )
    raise ProbeError(f"{label} has no {field!r} {noun} (it has {keys}); {fix}.")


def _select(records: list[Any], where: Where, label: str) -> list[Any]:
    conditions = parse_where(where)
    for field in conditions:
        _require(records, field, label, "where")
    kept = [
        r for r in records if all(isinstance(r, dict) and field in r and _as_text(r[field]) in values
                                  for field, values in conditions.items())
    ]  # fmt: skip
    if records and not kept:
        seen = {f: sorted({_as_text(r[f]) for r in records if isinstance(r, dict) and f in r}) for f in conditions}
        shown = {f: v[:10] + (["..."] if len(v) > 10 else []) for f, v in seen.items()}
        raise ProbeError(f"no record of {label} matches where {conditions}; the values there are {shown}.")
    return kept


def _field(record: Any, field: str, where: str) -> str:
    if isinstance(record, str) and field == "prompt":
        return record
    if not isinstance(record, dict) or field not in record:
        keys = list(record) if isinstance(record, dict) else type(record).__name__
        raise ProbeError(
            f"{where} has no {field!r} field (it has {keys}); pass the field name, e.g. prompt_field='goal'."
        )
    value = record[field]
    if not isinstance(value, str):
        raise ProbeError(f"{where}: field {field!r} must be a string, got {type(value).__name__}.")
    return value


def read_prompts(
    source: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    where: Where = None,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
) -> list[str]:
    """Prompts from a text / JSONL / JSON / CSV file or ``hf:NAME[@SPLIT]`` (see the module docstring).

    Args:
        source: the file or ``hf:`` data set.
        prompt_field: the field (column) holding the prompt; plain text lines are prompts as they are.
        where: keep only matching records (:func:`parse_where`), before ``limit``.
        split, config: of a Hugging Face data set.
        limit: keep the first ``limit`` prompts.
    """
    records, label = _records(source, split, config)
    if not all(isinstance(r, str) for r in records) or prompt_field != "prompt":
        _require(records, prompt_field, label, "prompt_field")
    records = _select(records, where, label)
    prompts = [_field(r, prompt_field, f"{label} record {i}") for i, r in enumerate(records)]
    prompts = prompts[:limit] if limit is not None else prompts
    if not prompts:
        raise ProbeError(f"{label} holds no prompts; give a file with at least one non-empty line or record.")
    return prompts


def read_examples(
    source: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    where: Where = None,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Prompt/response pairs from a JSONL / JSON / CSV file or ``hf:NAME[@SPLIT]`` (arguments as for
    :func:`read_prompts`, plus ``response_field``)."""
    records, label = _records(source, split, config)
    if records and all(isinstance(r, str) for r in records):
        raise ProbeError(
            f"{label} holds plain prompts; fine-tuning data needs a response too. Use JSONL lines such as "
            '{"prompt": "...", "response": "..."}.'
        )
    _require(records, prompt_field, label, "prompt_field")
    _require(records, response_field, label, "response_field")
    records = _select(records, where, label)
    out = [
        Example(_field(r, prompt_field, f"{label} record {i}"), _field(r, response_field, f"{label} record {i}"))
        for i, r in enumerate(records)
    ]
    out = out[:limit] if limit is not None else out
    if not out:
        raise ProbeError(f"{label} holds no examples.")
    return out
