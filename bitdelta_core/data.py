"""Task registry and dataset loading (local TSV/CSV/JSONL files, optional Hugging Face ``datasets``).

A :class:`TaskSpec` says what a task's examples look like: the text field(s) (one sentence or a
pair), the label names in class-id order (``None`` for regression), the metric, and where its
data lives (a Hugging Face dataset id, and for the tasks shipped with the package, in
``bitdelta_core/task_data``, the file layout of each split). All nine GLUE subsets plus ``ag_news`` and ``subj`` are registered.

Local files (:func:`load_file`)::

    format   tsv (csv module, delimiter "\\t", quoting=QUOTE_NONE: sentences keep their quotes),
             csv (standard RFC-4180 quoting), jsonl (one JSON object per line);
             default: from the file extension (.tsv/.txt -> tsv, .csv -> csv, .jsonl/.json -> jsonl)
    header   True / False / None = auto (the first row is a header when it contains a known
             column name: the task's text keys, "label", or a column the caller named)
    columns  by name (needs a header, or JSONL keys) or by 0-based index; when nothing is given:
             the task's text keys and ``label`` for files with a header; for files without one,
             the label column is whichever of the first/last column holds only valid labels
             and the rest are text (after dropping a leading integer ``index`` column)
    labels   integer class ids (``"0"``..``"k-1"``) or label names (case-insensitive), mixed
             freely; values outside the label set raise :class:`DataError` naming the line.
             Without a task, ``labels=[...]`` fixes the set, else it is inferred from the data
             (sorted; numerically when every value is an integer).

Every problem a user can cause raises :class:`~bitdelta_core.errors.DataError` naming the file,
line or column.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

from .errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalLayout:
    """How one shipped file is laid out (``<data dir>/<task>/<file>``, see :func:`default_data_dir`)."""

    file: str
    header: bool
    text_cols: tuple[str | int, ...]
    label_col: str | int


@dataclass(frozen=True)
class TaskSpec:
    """A classification (or regression) task.

    ``labels`` are the label names in class-id order (``None``: regression, one float output).
    ``metric`` is the task's own metric: ``accuracy``, ``mcc``, ``f1`` (positive class = id 1)
    or ``pearson``. ``hf`` is ``(path, config)`` for ``datasets.load_dataset``; ``hf_splits`` maps
    our split names to the hub's. ``local`` maps split names to shipped files.
    """

    name: str
    text_keys: tuple[str, ...]
    labels: tuple[str, ...] | None
    metric: str
    hf: tuple[str, str | None] | None = None
    hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})
    label_key: str = "label"
    local: dict[str, LocalLayout] = field(default_factory=dict)
    eval_split: str = "validation"
    description: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels is not None else 1

    @property
    def is_regression(self) -> bool:
        return self.labels is None


def _glue(name, keys, labels, metric, desc, **kw) -> TaskSpec:
    return TaskSpec(name, keys, labels, metric, hf=("nyu-mll/glue", name), description=desc, **kw)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        _glue("cola", ("sentence",), ("unacceptable", "acceptable"), "mcc", "grammatical acceptability",
              local={"train": LocalLayout("cola/train.tsv", False, (0,), 1),
                     "validation": LocalLayout("cola/validation.tsv", False, (0,), 1)}),
        _glue("sst2", ("sentence",), ("negative", "positive"), "accuracy", "binary sentiment",
              local={"train": LocalLayout("sst2/train.tsv", True, ("sentence",), "label"),
                     "validation": LocalLayout("sst2/validation.tsv", True, ("sentence",), "label")}),
        _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1", "paraphrase"),
        _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1", "duplicate questions"),
        _glue("stsb", ("sentence1", "sentence2"), None, "pearson", "semantic similarity (0-5, regression)"),
        _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "accuracy",
              "natural language inference",
              hf_splits={"train": "train", "validation": "validation_matched", "test": "validation_mismatched"}),
        _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy", "question NLI"),
        _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "accuracy",
              "recognising textual entailment",
              local={"train": LocalLayout("rte/train.tsv", True, ("sentence1", "sentence2"), "label"),
                     "validation": LocalLayout("rte/validation.tsv", True, ("sentence1", "sentence2"), "label"),
                     "test": LocalLayout("rte/test.tsv", True, ("sentence1", "sentence2"), "label")},
              # the 139-row validation split is too small to resolve a 1-point drop; the shipped
              # test split (1,384 rows) is labelled, so it is the default evaluation split
              eval_split="test"),
        _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), "accuracy",
              "Winograd NLI"),
        TaskSpec("ag_news", ("text",), ("World", "Sports", "Business", "Sci/Tech"), "accuracy",
                 hf=("fancyzhx/ag_news", None), hf_splits={"train": "train", "test": "test"},
                 local={"train": LocalLayout("ag_news/train.tsv", True, ("text",), "label"),
                        "test": LocalLayout("ag_news/test.tsv", True, ("text",), "label")},
                 eval_split="test", description="news topic (4 classes)"),
        TaskSpec("subj", ("text",), ("subjective", "objective"), "accuracy",
                 hf=("SetFit/subj", None), hf_splits={"train": "train", "test": "test"},
                 local={"train": LocalLayout("subj/train.tsv", False, (1,), 0),
                        "validation": LocalLayout("subj/validation.tsv", False, (1,), 0)},
                 description="subjectivity (0 = subjective review sentence, 1 = objective plot sentence)"),
    ]
}

METRICS = ("accuracy", "mcc", "f1", "pearson")


def get_task(name: str | TaskSpec) -> TaskSpec:
    if isinstance(name, TaskSpec):
        return name
    try:
        return TASKS[name.lower()]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


SHIPPED_DATA = "task_data"  # package data of bitdelta_core (pyproject [tool.setuptools.package-data])


def shipped_data_dir() -> Path:
    """The task files shipped inside the installed package (``bitdelta_core/task_data``).

    Found with :mod:`importlib.resources`, so it works the same from a checkout, an editable
    install and a wheel. A package imported from a zip archive has no directory to point at.
    """
    root = resources.files(__package__).joinpath(SHIPPED_DATA)
    if not isinstance(root, Path):
        raise DataError(f"the shipped task data is inside an archive ({root}); install the package "
                        "unzipped or set BITDELTA_DATA_DIR")
    return root


def default_data_dir() -> Path:
    """``$BITDELTA_DATA_DIR`` when set, else :func:`shipped_data_dir`."""
    env = os.environ.get("BITDELTA_DATA_DIR")
    return Path(env) if env else shipped_data_dir()


@dataclass
class TextDataset:
    """Examples of one task: ``texts[i]`` is a 1- or 2-tuple of strings, ``labels[i]`` a class
    id (``int``) or a float for regression. ``label_names`` are in class-id order."""

    texts: list[tuple[str, ...]]
    labels: list
    label_names: list[str] | None
    task: TaskSpec
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names is not None else 1

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    def subset(self, n: int | None, seed: int = 0) -> "TextDataset":
        """A random subset of ``n`` examples (all when ``n`` is None or >= len)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise DataError(f"subset size must be positive, got {n}")
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return TextDataset([self.texts[i] for i in idx], [self.labels[i] for i in idx],
                           self.label_names, self.task, f"{self.source}[{n} of {len(self)}]")

    def check_num_labels(self, num_labels: int, what: str = "the model") -> None:
        """Raise :class:`DataError` unless the dataset's label count matches a model head."""
        if num_labels != self.num_labels:
            raise DataError(
                f"{self.source or self.task.name}: the data has {self.num_labels} label(s) "
                f"({', '.join(self.label_names or ['<regression>'])}) but {what} has a {num_labels}-way head"
            )


# ---- reading files -----------------------------------------------------------------------


def detect_format(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in (".tsv", ".txt", ".tab"):
        return "tsv"
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the format from extension {ext!r}; pass format='tsv'|'csv'|'jsonl'")


def _read_rows(path: Path, fmt: str) -> list[list[str]] | list[dict]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if fmt == "tsv":
                rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
            elif fmt == "csv":
                rows = [r for r in csv.reader(f) if r]
            elif fmt == "jsonl":
                rows = []
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{path}:{i}: each JSONL line must be an object, got {type(obj).__name__}")
                    rows.append(obj)
            else:
                raise DataError(f"unknown format {fmt!r}; use tsv, csv or jsonl")
    except FileNotFoundError:
        raise DataError(f"data file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed {fmt} ({e})") from None
    return rows


def _parse_col(c) -> str | int:
    """CLI helper: ``"0"`` -> 0 (index), anything else stays a column name."""
    if isinstance(c, int):
        return c
    s = str(c).strip()
    return int(s) if s.lstrip("-").isdigit() else s


class _LabelMap:
    """Raw label value -> class id (or float for regression)."""

    def __init__(self, names: Sequence[str] | None):
        self.names = list(names) if names is not None else None
        self._by_name = {n.lower(): i for i, n in enumerate(self.names or [])}

    def __call__(self, raw) -> int | float | None:
        if self.names is None:
            try:
                return float(raw)
            except (TypeError, ValueError):
                return None
        if isinstance(raw, bool):
            raw = int(raw)
        if isinstance(raw, int) or (isinstance(raw, float) and raw.is_integer()):
            i = int(raw)
            return i if 0 <= i < len(self.names) else None
        s = str(raw).strip()
        if s.lower() in self._by_name:
            return self._by_name[s.lower()]
        if s.lstrip("-").isdigit():
            i = int(s)
            return i if 0 <= i < len(self.names) else None
        return None


def _infer_label_names(values: list) -> list[str]:
    uniq = sorted({str(v).strip() for v in values})
    if not uniq:
        raise DataError("no labels to infer a label set from")
    if all(u.lstrip("-").isdigit() for u in uniq):
        ints = sorted(int(u) for u in uniq)
        if ints[0] < 0:
            raise DataError(f"integer labels must be >= 0, got {ints[0]}")
        # class ids 0..max, so "0/1" stays "0"->0, "1"->1 even when one class is absent
        return [str(i) for i in range(ints[-1] + 1)]
    return uniq


def load_file(
    path: str | os.PathLike,
    task: str | TaskSpec | None = None,
    *,
    format: str | None = None,
    header: bool | None = None,
    text_cols: Sequence[str | int] | None = None,
    label_col: str | int | None = None,
    labels: Sequence[str] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> TextDataset:
    """Load a labelled local file (see the module docstring for every option).

    ``task`` gives the label set and default column names; without it ``labels`` (or the data
    itself) gives the label set and ``text_cols`` default to ``text``/``sentence`` columns.
    """
    path = Path(path)
    spec = get_task(task) if task is not None else None
    fmt = (format or detect_format(path)).lower()
    if fmt not in ("tsv", "csv", "jsonl"):
        raise DataError(f"unknown format {format!r}; use tsv, csv or jsonl")
    rows = _read_rows(path, fmt)
    if not rows:
        raise DataError(f"{path}: the file is empty (no rows)")
    text_cols = [_parse_col(c) for c in text_cols] if text_cols else None
    label_col = _parse_col(label_col) if label_col is not None else None
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) < 2:
            raise DataError(f"a label set needs at least 2 names, got {labels}")
        if len(set(labels)) != len(labels):
            raise DataError(f"label names must be distinct, got {labels}")
    if spec is not None and labels is not None and spec.labels is not None and len(labels) != len(spec.labels):
        raise DataError(f"task {spec.name} has {len(spec.labels)} labels {list(spec.labels)}, got labels={labels}")
    label_names = labels if labels is not None else (list(spec.labels) if spec and spec.labels else None)
    regression = spec is not None and spec.is_regression and labels is None

    if fmt == "jsonl":
        texts_raw, label_raw, lines = _columns_jsonl(path, rows, spec, text_cols, label_col)
    else:
        texts_raw, label_raw, lines = _columns_table(path, rows, spec, text_cols, label_col, header,
                                                     label_names, regression)
    if not texts_raw:
        raise DataError(f"{path}: the file has a header but no data rows")

    if label_names is None and not regression:
        label_names = _infer_label_names(label_raw)
    lmap = _LabelMap(None if regression else label_names)
    out_labels = []
    bad: list[tuple[int, object]] = []
    for raw, ln in zip(label_raw, lines):
        v = lmap(raw)
        if v is None:
            bad.append((ln, raw))
        out_labels.append(v)
    if bad:
        shown = ", ".join(f"line {ln}: {raw!r}" for ln, raw in bad[:5])
        what = "a number" if regression else f"one of {label_names} or a class id 0..{len(label_names) - 1}"
        raise DataError(f"{path}: {len(bad)} label value(s) not in the label set (expected {what}): {shown}")
    name = spec.name if spec is not None else path.stem
    ds = TextDataset(texts_raw, out_labels, label_names, spec or _custom_task(name, texts_raw, label_names),
                     str(path))
    logger.info("loaded %d examples from %s (%s, %d label(s))", len(ds), path, fmt, ds.num_labels)
    return ds.subset(max_examples, seed)


def _custom_task(name: str, texts, label_names) -> TaskSpec:
    n = len(texts[0]) if texts else 1
    keys = ("text",) if n == 1 else tuple(f"text{i + 1}" for i in range(n))
    return TaskSpec(name, keys, tuple(label_names) if label_names is not None else None,
                    "accuracy" if label_names is not None else "pearson")


_TEXT_DEFAULTS = (("sentence",), ("text",), ("sentence1", "sentence2"), ("question1", "question2"),
                  ("premise", "hypothesis"), ("question", "sentence"))


def _default_text_names(spec: TaskSpec | None, available: Sequence[str]) -> list[str]:
    if spec is not None:
        return list(spec.text_keys)
    for keys in _TEXT_DEFAULTS:
        if all(k in available for k in keys):
            return list(keys)
    raise DataError(f"no text column given and none of the usual names (sentence, text, sentence1/2, ...) "
                    f"is among the columns {list(available)}; pass text_cols / --text-col")


def _columns_jsonl(path, rows, spec, text_cols, label_col):
    keys = list(rows[0].keys())

    def name_of(c):
        if isinstance(c, int):
            if not -len(keys) <= c < len(keys):
                raise DataError(f"{path}: column index {c} out of range; the first record has {len(keys)} keys {keys}")
            return keys[c]
        return c

    tcols = [name_of(c) for c in text_cols] if text_cols else _default_text_names(spec, keys)
    lcol = name_of(label_col) if label_col is not None else (spec.label_key if spec else "label")
    texts, labels, lines = [], [], []
    for i, obj in enumerate(rows, 1):
        missing = [c for c in [*tcols, lcol] if c not in obj]
        if missing:
            raise DataError(f"{path}:{i}: missing column(s) {missing}; the record has keys {list(obj)}")
        texts.append(tuple(str(obj[c]) for c in tcols))
        labels.append(obj[lcol])
        lines.append(i)
    return texts, labels, lines


def _columns_table(path, rows, spec, text_cols, label_col, header, label_names, regression):
    first = [c.strip() for c in rows[0]]
    named = [c for c in [*(text_cols or []), label_col] if isinstance(c, str)]
    if header is None:
        known = set(named) | {"label"} | set(spec.text_keys if spec else ()) | {k for ks in _TEXT_DEFAULTS for k in ks}
        if spec is not None:
            known.add(spec.label_key)
        header = any(c in known for c in first)
    columns = first if header else None
    data = rows[1:] if header else rows
    start_line = 2 if header else 1
    if not data:
        return [], [], []
    width = len(data[0])

    def index_of(c) -> int:
        if isinstance(c, int):
            if not -width <= c < width:
                raise DataError(f"{path}: column index {c} out of range; rows have {width} columns")
            return c % width
        if columns is None:
            raise DataError(f"{path}: column {c!r} given by name but the file has no header; "
                            f"use a 0-based index (rows have {width} columns)")
        if c not in columns:
            raise DataError(f"{path}: missing column {c!r}; the header has {columns}")
        return columns.index(c)

    if label_col is not None:
        li = index_of(label_col)
    elif columns is not None:
        li = index_of(spec.label_key if spec else "label")
    else:
        li = _guess_label_index(path, data, label_names, regression, width)
    if text_cols:
        tis = [index_of(c) for c in text_cols]
    elif columns is not None:
        tis = [index_of(c) for c in _default_text_names(spec, columns)]
    else:
        tis = [i for i in range(width) if i != li]
        if len(tis) > 1 and all(r[tis[0]].strip().isdigit() for r in data[:50] if len(r) > tis[0]):
            tis = tis[1:]  # a leading integer "index" column
        want = len(spec.text_keys) if spec else None
        if want is not None and len(tis) != want:
            raise DataError(f"{path}: cannot tell which of columns {tis} hold the text of task {spec.name} "
                            f"({want} text field(s)); pass text_cols / --text-col")
    texts, labels, lines = [], [], []
    need = max([li, *tis]) + 1
    for n, r in enumerate(data):
        if len(r) < need:
            raise DataError(f"{path}:{start_line + n}: row has {len(r)} column(s), need at least {need} "
                            f"(is the delimiter right? format is {'tsv' if path.suffix != '.csv' else 'csv'})")
        texts.append(tuple(r[i] for i in tis))
        labels.append(r[li].strip())
        lines.append(start_line + n)
    return texts, labels, lines


def _guess_label_index(path, data, label_names, regression, width) -> int:
    if width < 2:
        raise DataError(f"{path}: rows have {width} column, need a text and a label column")
    lmap = _LabelMap(None if regression else label_names) if (label_names is not None or regression) else None
    sample = data[:200]

    def ok(i):
        vals = [r[i].strip() for r in sample if len(r) > i]
        if lmap is not None:
            return all(lmap(v) is not None for v in vals)
        return len(set(vals)) <= max(2, len(sample) // 10) and all(len(v) < 30 for v in vals)

    cands = [i for i in (width - 1, 0) if ok(i)]
    if len(cands) != 1:
        raise DataError(f"{path}: no header and cannot tell whether the label is the first or the last "
                        "column; pass label_col / --label-col (0-based index)")
    return cands[0]


# ---- tasks: shipped files and Hugging Face datasets -------------------------------------


def hf_available() -> bool:
    return importlib.util.find_spec("datasets") is not None


def load_task(
    task: str | TaskSpec,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    source: str = "auto",
) -> TextDataset:
    """A registered task's split: from the shipped files (``data_dir``, default
    :func:`default_data_dir`) or, with ``source="hf"`` / when no local file exists, from the
    Hugging Face hub via ``datasets`` (optional; only if importable and reachable).

    ``split="eval"`` means the task's evaluation split (``TaskSpec.eval_split``).
    """
    spec = get_task(task)
    if split == "eval":
        split = spec.eval_split
    if source not in ("auto", "local", "hf"):
        raise DataError(f"source must be auto, local or hf, got {source!r}")
    layout = spec.local.get(split)
    if source != "hf" and layout is not None:
        root = Path(data_dir) if data_dir is not None else default_data_dir()
        p = root / layout.file
        if p.is_file() or source == "local":
            return load_file(p, spec, header=layout.header, text_cols=layout.text_cols,
                             label_col=layout.label_col, max_examples=max_examples, seed=seed)
    if source == "local" or layout is None and source == "auto" and not hf_available():
        have = ", ".join(sorted(spec.local)) or "none"
        raise DataError(f"task {spec.name}: no local file for split {split!r} (shipped splits: {have}); "
                        "pass a file with --data, or install `datasets` for hub access")
    return load_hf(spec, split, max_examples=max_examples, seed=seed)


def load_hf(task: str | TaskSpec, split: str = "train", *, max_examples: int | None = None,
            seed: int = 0) -> TextDataset:
    """Load from the Hugging Face hub with ``datasets`` (optional dependency)."""
    spec = get_task(task)
    if not hf_available():
        raise DataError("the `datasets` package is not installed; use a local file (--data)")
    if spec.hf is None:
        raise DataError(f"task {spec.name} has no Hugging Face dataset id")
    import datasets  # noqa: PLC0415 - optional dependency

    hf_split = spec.hf_splits.get(split, split)
    try:
        d = datasets.load_dataset(spec.hf[0], spec.hf[1], split=hf_split)
    except Exception as e:  # noqa: BLE001 - offline, unknown split, ...
        raise DataError(f"cannot load {spec.hf} split {hf_split!r} from the hub: {e}") from None
    texts = list(zip(*[d[k] for k in spec.text_keys]))
    raw = d[spec.label_key]
    lmap = _LabelMap(spec.labels)
    labels = [lmap(v) for v in raw]
    if any(v is None for v in labels):
        raise DataError(f"{spec.hf} split {hf_split!r} holds labels outside {spec.labels} (unlabelled test split?)")
    ds = TextDataset([tuple(str(x) for x in t) for t in texts], labels,
                     list(spec.labels) if spec.labels else None, spec, f"hf:{spec.hf[0]}/{hf_split}")
    return ds.subset(max_examples, seed)


def load_dataset(
    task: str | TaskSpec | None = None,
    data: str | os.PathLike | None = None,
    *,
    split: str = "train",
    format: str | None = None,
    header: bool | None = None,
    text_cols: Sequence[str | int] | None = None,
    label_col: str | int | None = None,
    labels: Sequence[str] | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> TextDataset:
    """One entry point for the CLI: a file (``data``) or a registered task's split."""
    if data is not None:
        spec = get_task(task) if task is not None else None
        # the shipped layout is the default for the shipped file of a task (no header etc.)
        if spec is not None and header is None and text_cols is None and label_col is None:
            for lay in spec.local.values():
                if Path(data).resolve() == (Path(data_dir) if data_dir else default_data_dir()).resolve() / lay.file:
                    header, text_cols, label_col = lay.header, lay.text_cols, lay.label_col
        return load_file(data, spec, format=format, header=header, text_cols=text_cols, label_col=label_col,
                         labels=labels, max_examples=max_examples, seed=seed)
    if task is None:
        raise DataError("give a task (--task) or a data file (--data)")
    if any(x is not None for x in (format, header, text_cols, label_col)):
        raise DataError("format/header/column options need a data file (--data)")
    return load_task(task, split, data_dir=data_dir, max_examples=max_examples, seed=seed)


__all__ = ["TASKS", "TaskSpec", "TextDataset", "LocalLayout", "get_task", "load_file", "load_task",
           "load_hf", "load_dataset", "default_data_dir", "shipped_data_dir", "hf_available", "METRICS"]
