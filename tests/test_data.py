"""Dataset loading: every file format/layout, the shipped tasks, and typed errors on bad input."""

from __future__ import annotations

import json

import pytest

from bitdelta_core.data import TASKS, default_data_dir, get_task, load_dataset, load_file, load_task
from bitdelta_core.errors import DataError

GLUE = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---- registry -----------------------------------------------------------------------------


def test_registry_has_glue_and_extra_tasks():
    assert set(GLUE) | {"ag_news", "subj"} <= set(TASKS)
    assert get_task("cola").metric == "mcc" and get_task("mrpc").metric == "f1"
    assert get_task("qqp").metric == "f1" and get_task("stsb").metric == "pearson"
    assert get_task("stsb").labels is None and get_task("stsb").num_labels == 1
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    assert get_task("rte").text_keys == ("sentence1", "sentence2")
    assert get_task("qnli").text_keys == ("question", "sentence")
    assert get_task("qqp").text_keys == ("question1", "question2")
    assert get_task("ag_news").labels == ("World", "Sports", "Business", "Sci/Tech")


def test_unknown_task_is_a_typed_error():
    with pytest.raises(DataError, match="unknown task 'glue_x'.*cola"):
        get_task("glue_x")


# ---- local file formats -------------------------------------------------------------------

SENTS = ['he said "hi there', "it 's a 'quoted' film", "plain words", "a, comma"]


@pytest.mark.parametrize("case", ["header_label_last", "no_header_label_last", "no_header_label_first",
                                  "header_label_first_by_name"])
def test_tsv_layouts(tmp_path, case):
    labels = [1, 0, 1, 0]
    if case == "header_label_last":
        text = "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in zip(SENTS, labels))
        kw = {}
    elif case == "no_header_label_last":
        text = "".join(f"{s}\t{y}\n" for s, y in zip(SENTS, labels))
        kw = {"header": False, "text_cols": [0], "label_col": 1}
    elif case == "no_header_label_first":
        text = "".join(f"{y}\t{s}\n" for s, y in zip(SENTS, labels))
        kw = {"header": False, "text_cols": [1], "label_col": 0}
    else:
        text = "label\tsentence\n" + "".join(f"{y}\t{s}\n" for s, y in zip(SENTS, labels))
        kw = {"text_cols": ["sentence"], "label_col": "label"}
    ds = load_file(write(tmp_path, "d.tsv", text), "sst2", **kw)
    assert [t[0] for t in ds.texts] == SENTS  # quotes survive (QUOTE_NONE)
    assert ds.labels == labels and ds.label_names == ["negative", "positive"]


@pytest.mark.parametrize("label_first", [False, True], ids=["label_last", "label_first"])
def test_no_header_auto_detects_label_column(tmp_path, label_first):
    rows = [(s, y) for s, y in zip(SENTS * 3, [0, 1, 1, 0] * 3)]
    text = "".join((f"{y}\t{s}\n" if label_first else f"{s}\t{y}\n") for s, y in rows)
    ds = load_file(write(tmp_path, "d.tsv", text), "cola")
    assert [t[0] for t in ds.texts] == [s for s, _ in rows]
    assert ds.labels == [y for _, y in rows]


def test_string_labels_with_task_and_inferred(tmp_path):
    text = "text\tlabel\n" + "a\tSports\nb\tWorld\nc\tsci/tech\nd\tBusiness\ne\t1\n"
    ds = load_file(write(tmp_path, "d.tsv", text), "ag_news")
    assert ds.labels == [1, 0, 3, 2, 1]  # names (case-insensitive) and integer ids mix
    ds2 = load_file(write(tmp_path, "e.tsv", "text\tlabel\na\tpos\nb\tneg\nc\tpos\n"))
    assert ds2.label_names == ["neg", "pos"] and ds2.labels == [1, 0, 1]
    ds3 = load_file(write(tmp_path, "f.tsv", "text\tlabel\na\tpos\nb\tneg\n"), labels=["pos", "neg"])
    assert ds3.labels == [0, 1]


def test_integer_labels_inferred_as_class_ids(tmp_path):
    ds = load_file(write(tmp_path, "d.tsv", "text\tlabel\na\t2\nb\t0\nc\t2\n"))
    assert ds.label_names == ["0", "1", "2"] and ds.labels == [2, 0, 2]


def test_csv_with_quotes_and_commas(tmp_path):
    text = 'review,stars\n"great, really ""great"" film",good\n"he said ""no""",bad\nplain,good\n'
    ds = load_file(write(tmp_path, "d.csv", text), text_cols=["review"], label_col="stars", labels=["bad", "good"])
    assert [t[0] for t in ds.texts] == ['great, really "great" film', 'he said "no"', "plain"]
    assert ds.labels == [1, 0, 1]


def test_csv_no_header_label_first_by_index(tmp_path):
    text = 'pos,"nice, very nice"\nneg,"bad ""bad"""\n'
    ds = load_file(write(tmp_path, "d.csv", text), header=False, text_cols=[1], label_col=0)
    assert ds.texts == [("nice, very nice",), ('bad "bad"',)] and ds.labels == [1, 0]


def test_jsonl_pairs(tmp_path):
    recs = [{"sentence1": 'A "b" c', "sentence2": "d", "label": "entailment"},
            {"sentence1": "e", "sentence2": "f", "label": 1}]
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    ds = load_file(p, "rte")
    assert ds.texts == [('A "b" c', "d"), ("e", "f")] and ds.labels == [0, 1]
    ds2 = load_file(p, text_cols=[0, 1], label_col=2)  # JSONL columns by index = key order
    assert ds2.texts == ds.texts


def test_regression_labels(tmp_path):
    ds = load_file(write(tmp_path, "d.tsv", "sentence1\tsentence2\tlabel\na\tb\t3.5\nc\td\t0\n"), "stsb")
    assert ds.is_regression and ds.labels == [3.5, 0.0] and ds.num_labels == 1


def test_subset_is_seeded():
    ds = load_task("cola", "validation")
    a, b = ds.subset(50, seed=3), ds.subset(50, seed=3)
    assert a.texts == b.texts and len(a) == 50 and a.texts != ds.subset(50, seed=4).texts


# ---- the shipped tasks, each with its documented command line ----------------------------

SHIPPED = {  # task -> (train rows, eval split, eval rows, explicit CLI-style options for train.tsv)
    "sst2": (67349, "validation", 872, dict(text_cols=["sentence"], label_col="label")),
    "cola": (8551, "validation", 516, dict(header=False, text_cols=[0], label_col=1)),
    "rte": (1244, "test", 1384, dict(text_cols=["sentence1", "sentence2"], label_col="label")),
    "ag_news": (10001, "test", 7600, dict(text_cols=["text"], label_col="label")),
    "subj": (8000, "validation", 2000, dict(header=False, text_cols=[1], label_col=0)),
}


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_tasks_load(task):
    n_train, split, n_eval, opts = SHIPPED[task]
    spec = get_task(task)
    train = load_task(task, "train")
    assert len(train) == n_train and train.label_names == list(spec.labels)
    assert set(train.labels) == set(range(spec.num_labels))
    assert all(len(t) == len(spec.text_keys) and all(isinstance(s, str) and s for s in t) for t in train.texts[:100])
    ev = load_task(task, "eval")
    assert spec.eval_split == split and len(ev) == n_eval
    path = default_data_dir() / task / "train.tsv"
    explicit = load_dataset(task, path, **opts)  # the documented command line's options
    assert explicit.texts == train.texts and explicit.labels == train.labels


def test_rte_validation_split():
    ds = load_task("rte", "validation")
    assert len(ds) == 139 and all(len(t) == 2 for t in ds.texts) and set(ds.labels) == {0, 1}


# ---- errors -------------------------------------------------------------------------------


def test_label_not_in_label_set_names_the_line(tmp_path):
    p = write(tmp_path, "d.tsv", "sentence\tlabel\na\t1\nb\tmaybe\nc\t2\n")
    with pytest.raises(DataError, match=r"2 label value\(s\) not in the label set.*line 3: 'maybe'.*line 4: '2'"):
        load_file(p, "sst2")


def test_missing_column(tmp_path):
    p = write(tmp_path, "d.tsv", "text\tlabel\na\t1\n")
    with pytest.raises(DataError, match="missing column 'sentence'"):
        load_file(p, "sst2")
    with pytest.raises(DataError, match="missing column 'review'"):
        load_file(p, text_cols=["review"])
    j = write(tmp_path, "d.jsonl", '{"text": "a"}\n')
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\]"):
        load_file(j)


def test_column_index_out_of_range_and_name_without_header(tmp_path):
    p = write(tmp_path, "d.tsv", "a\t1\nb\t0\n")
    with pytest.raises(DataError, match="column index 5 out of range"):
        load_file(p, header=False, text_cols=[5], label_col=1)
    with pytest.raises(DataError, match="no header"):
        load_file(p, header=False, text_cols=["sentence"], label_col=1)


@pytest.mark.parametrize("name,text,match", [
    ("empty.tsv", "", "empty"),
    ("blank.jsonl", "\n\n", "empty"),
    ("header_only.tsv", "sentence\tlabel\n", "no data rows"),
])
def test_empty_files(tmp_path, name, text, match):
    with pytest.raises(DataError, match=match):
        load_file(write(tmp_path, name, text), "sst2")


def test_missing_file_bad_format_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_file(write(tmp_path, "d.xlsx", "x"))
    with pytest.raises(DataError, match="not valid JSON"):
        load_file(write(tmp_path, "d.jsonl", '{"text": "a", "label": 1}\n{oops\n'))


def test_label_count_differs_from_model_head(tmp_path):
    ds = load_file(write(tmp_path, "d.tsv", "text\tlabel\na\tx\nb\ty\nc\tz\n"))
    ds.check_num_labels(3)
    with pytest.raises(DataError, match="3 label.*2-way head"):
        ds.check_num_labels(2)


def test_load_dataset_needs_task_or_file():
    with pytest.raises(DataError, match="give a task"):
        load_dataset()
    with pytest.raises(DataError, match="need a data file"):
        load_dataset("cola", header=False)
    with pytest.raises(DataError, match="no local file for split"):
        load_task("mrpc", "train", source="local")
